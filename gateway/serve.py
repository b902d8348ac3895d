"""``prefixgate serve``: the main job — N embedded engine workers as child processes, then the
gateway in front of them; the workers stop with it."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from gateway import run as gateway_run

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gateway_run.add_arguments(parser, workers_required=False)
    parser.add_argument("--workers", type=int, default=1, help="embedded engine workers to start")
    parser.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for each engine, e.g. --engine-arg=--max-batch-tokens=256",
    )
    parser.add_argument("--startup-timeout", type=float, default=600.0)


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports. All are held open until all are chosen: picking them one
    at a time can hand out the same port twice before any engine has bound it."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_port() -> int:
    return free_ports(1)[0]


@dataclass(frozen=True)
class LaunchedWorker:
    url: str
    process: subprocess.Popen


@contextlib.contextmanager
def engine_workers(
    count: int, model: str | None, extra: list[str], timeout: float
) -> Iterator[list[LaunchedWorker]]:
    """Start ``count`` engine servers on loopback, wait until healthy, yield them, stop them."""
    procs: list[subprocess.Popen] = []
    urls: list[str] = []
    try:
        ports = free_ports(2 * count)
        for port, events in zip(ports[::2], ports[1::2], strict=True):
            cmd = [
                sys.executable,
                "-m",
                "gateway.cli",
                "engine",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--kv-events-endpoint",
                f"tcp://127.0.0.1:{events}",
                *extra,
            ]
            if model:
                cmd += ["--model", model]
            procs.append(subprocess.Popen(cmd, start_new_session=True))
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + timeout
        for proc, url in zip(procs, urls, strict=True):
            while not _healthy(url):
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"engine worker {url} exited with code {proc.returncode} while starting"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"engine worker {url} not healthy after {timeout:.0f} s")
                time.sleep(0.5)
            log.info("engine worker ready at %s", url)
        yield [LaunchedWorker(url, proc) for url, proc in zip(urls, procs, strict=True)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def run(args: argparse.Namespace) -> int:
    with engine_workers(args.workers, args.model, args.engine_arg, args.startup_timeout) as launched:
        gateway_run.serve_gateway(gateway_run.config_from_args(args, [w.url for w in launched]))
    return 0
