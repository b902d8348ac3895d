"""Start embedded engine workers as child processes, and pick free loopback ports for them.

Used by ``prefixgate serve``, the SGLang router demo and the tests, so there is one way to launch a
worker and one way to choose ports. Engines run as ``python -m gateway.cli engine ...`` (the gateway's
process boundary: nothing here imports ``engine``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STOP_GRACE_S = 15.0  # after SIGTERM, how long a worker may take to exit before SIGKILL


def free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct free ports on ``host``. All are held open until all are chosen: picking them one
    at a time can hand out the same port twice before anything has bound it."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]


def free_port(host: str = HOST) -> int:
    return free_ports(1, host)[0]


@dataclass(frozen=True)
class LaunchedWorker:
    url: str
    process: subprocess.Popen


def engine_command(
    port: int,
    *,
    model: str | None = None,
    extra: Sequence[str] = (),
    events_port: int | None = None,
    log_level: str | None = None,
) -> list[str]:
    """The command line of one engine worker listening on ``HOST:port`` (KV events on ``events_port``)."""
    cmd = [sys.executable, "-m", "gateway.cli"]
    if log_level:
        cmd += ["--log-level", log_level]
    cmd += ["engine", "--host", HOST, "--port", str(port)]
    if events_port is not None:
        cmd += ["--kv-events-endpoint", f"tcp://{HOST}:{events_port}"]
    cmd += list(extra)
    if model:
        cmd += ["--model", model]
    return cmd


@contextlib.contextmanager
def engine_workers(
    count: int,
    model: str | None = None,
    extra: Sequence[str] = (),
    timeout: float = 600.0,
    *,
    kv_events: bool = True,
    log_dir: Path | None = None,
    log_level: str | None = None,
) -> Iterator[list[LaunchedWorker]]:
    """Start ``count`` engine workers on loopback, wait until all answer ``/health``, yield them, stop them.

    Each runs in its own process group (stopped with SIGTERM, then SIGKILL after ``STOP_GRACE_S``);
    ``log_dir``: each worker's output goes to ``worker<i>.log`` there instead of this process's.
    """
    procs: list[subprocess.Popen] = []
    urls: list[str] = []
    logs_of: list[Path | None] = []
    with contextlib.ExitStack() as log_files:
        try:
            ports = free_ports(2 * count if kv_events else count)
            log.info(
                "starting %d engine worker%s (model %s); each loads the model before it answers",
                count,
                "" if count == 1 else "s",
                model or "the bundled default",
            )
            for i in range(count):
                port, events_port = (ports[2 * i], ports[2 * i + 1]) if kv_events else (ports[i], None)
                cmd = engine_command(
                    port, model=model, extra=extra, events_port=events_port, log_level=log_level
                )
                log_path = log_dir / f"worker{i}.log" if log_dir is not None else None
                logs_of.append(log_path)
                output = log_files.enter_context(open(log_path, "wb")) if log_path is not None else None
                procs.append(spawn(cmd, output))
                urls.append(f"http://{HOST}:{port}")
                log.info(
                    "engine worker %d/%d starting at %s (pid %d%s)",
                    i + 1,
                    count,
                    urls[-1],
                    procs[-1].pid,
                    f", output in {log_path}" if log_path is not None else "",
                )
            deadline = time.monotonic() + timeout
            for i, (proc, url, log_path) in enumerate(zip(procs, urls, logs_of, strict=True)):
                wait_healthy(proc, url, deadline, timeout, log_path)
                log.info("engine worker %d/%d ready at %s", i + 1, count, url)
            yield [LaunchedWorker(url, proc) for url, proc in zip(urls, procs, strict=True)]
        finally:
            stop_processes(procs)


def spawn(
    cmd: Sequence[str], output: IO[bytes] | None = None, env: Mapping[str, str] | None = None
) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, tied to this process's life: on Linux the kernel sends
    it SIGTERM when this process dies, however it dies (SIGKILL, OOM kill, SIGHUP from a closed
    terminal), so no worker is ever orphaned holding memory and a port."""
    return subprocess.Popen(
        list(cmd),
        stdout=output,
        stderr=subprocess.STDOUT if output else None,
        start_new_session=True,
        env=env,
        preexec_fn=_die_with_parent(os.getpid()) if sys.platform == "linux" else None,
    )


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child must not load anything

    def preexec() -> None:  # runs in the child between fork and exec
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def wait_healthy(
    proc: subprocess.Popen, url: str, deadline: float, timeout: float, log_path: Path | None
) -> None:
    see = f" (its output: {log_path})" if log_path is not None else ""
    while not healthy(url):
        if proc.poll() is not None:
            raise RuntimeError(f"worker {url} exited with code {proc.returncode} while starting{see}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"worker {url} not healthy after {timeout:.0f} s{see}")
        time.sleep(0.5)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def stop_processes(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    """Signal ``proc``'s process group (``spawn`` makes each child lead its own), or ``proc`` alone when it
    leads none (started elsewhere): a missing group must not leave it running and its stopper waiting."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):  # it exited on its own meanwhile
            proc.send_signal(sig)
