"""Launching workers: ports chosen together, and children that die with their parent however it dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from gateway.launcher import free_ports

PARENT = """
import sys, time
from gateway.launcher import spawn
child = spawn([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its reaper is gone for our purposes
        return f.read().split()[2] != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux's prctl")
def test_a_sigkilled_parent_leaves_no_worker_behind() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    assert _alive(child_pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10  # a bound on waiting, not a measured threshold
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child_pid), "the worker outlived its parent"


def test_ports_are_distinct() -> None:
    ports = free_ports(50)
    assert len(set(ports)) == 50
