"""``prefixgate gateway --procs N``: N processes on one port, sharing state through Redis (the shared one,
or a Redis Cluster of the test's own)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from gateway import cli
from gateway.launcher import free_port
from tests.cache.index.redis_util import delete_prefix, redis_url_for, unique_prefix


def test_more_than_one_process_without_redis_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert cli.main(["gateway", "--procs", "2", "--worker", "http://127.0.0.1:1"]) == 2
    assert "--procs 2 needs --redis" in caplog.text


def stats(port: int) -> dict | None:
    try:  # a new connection each time: SO_REUSEPORT spreads connections, not requests
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
            return orjson.loads(r.read())
    except OSError:
        return None


@pytest.fixture(params=["standalone", "cluster"])
def redis_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with redis_url_for(request.param, tmp_path) as url:
        yield url


@pytest.mark.slow  # starts gateway processes
def test_two_processes_serve_one_port_and_stop_together(redis_url: str) -> None:
    port, prefix = free_port(), unique_prefix()
    cmd = [sys.executable, "-m", "gateway.cli", "gateway", "--procs", "2", "--port", str(port)]
    cmd += ["--redis", redis_url, "--redis-key-prefix", prefix, "--worker", "http://127.0.0.1:1"]
    parent = subprocess.Popen(cmd, start_new_session=True)
    try:
        replicas: set[str] = set()
        deadline = time.monotonic() + 120  # a bound on waiting (two tokenizers load), not a threshold
        while len(replicas) < 2:
            assert time.monotonic() < deadline, f"only {replicas} answered"
            assert parent.poll() is None, "the gateway exited"
            answer = stats(port)
            if answer is not None:
                replicas.add(answer["replica"])  # each process names itself
            else:
                time.sleep(0.2)
        children = [
            int(p) for p in Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
        ]
        # besides the gateways, multiprocessing's resource tracker (it exits once the parent has gone)
        gateways = [pid for pid in children if b"resource_tracker" not in _cmdline(pid)]
        assert len(gateways) == 2
    finally:
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 0
        delete_prefix(redis_url, prefix)
    for pid in gateways:  # the parent joined them before it exited
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""
