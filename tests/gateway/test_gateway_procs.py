"""``prefixgate gateway --procs N``: N processes on one port, sharing state through Redis."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from gateway import cli
from gateway.launcher import free_port
from tests.cache.index.redis_util import SHARED_URL, delete_prefix, shared_redis_available, unique_prefix


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


@pytest.mark.slow  # starts gateway processes
@pytest.mark.skipif(not shared_redis_available(), reason="needs Redis at " + SHARED_URL)
def test_two_processes_serve_one_port_and_stop_together() -> None:
    port, prefix = free_port(), unique_prefix()
    cmd = [sys.executable, "-m", "gateway.cli", "gateway", "--procs", "2", "--port", str(port)]
    cmd += ["--redis", SHARED_URL, "--redis-key-prefix", prefix, "--worker", "http://127.0.0.1:1"]
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
        assert len(children) >= 2
    finally:
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 0
        delete_prefix(SHARED_URL, prefix)
    for pid in children:  # the parent joined them before it exited
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
