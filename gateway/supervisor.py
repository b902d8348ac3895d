"""Keep launched workers running: start them, wait until healthy, restart any that exits, stop them all.

Used by ``prefixgate serve --engine sglang|vllm``, whose gateway runs on the main thread: the watching
happens on one daemon thread (``Supervisor.watch``), which only ever touches ``Supervisor`` state under
its lock. Each worker runs in its own process group and dies with this process (``launcher.spawn``).

A restarted worker keeps its URL and ports: the gateway's health check marks it down meanwhile, and its
KV events restart from seq 0, which the gateway's event consumer sees as a restart (its index entries are
purged and rebuilt). Restarts back off exponentially (``restart_delay_s``, doubled up to
``MAX_RESTART_DELAY_S``) and reset once a worker has stayed up for ``STABLE_AFTER_S``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gateway.engines import EngineLaunch
from gateway.launcher import healthy, spawn, stop_processes, wait_healthy

log = logging.getLogger(__name__)

MAX_RESTART_DELAY_S = 60.0
STABLE_AFTER_S = 300.0  # up this long: the next crash restarts it after ``restart_delay_s`` again


@dataclass
class _Supervised:
    launch: EngineLaunch
    log_path: Path | None
    process: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    delay_s: float = 0.0
    restart_at: float | None = None  # it exited: start it again at this time


class Supervisor:
    def __init__(
        self,
        launches: Sequence[EngineLaunch],
        startup_timeout_s: float = 600.0,
        log_dir: Path | None = None,
        restart_delay_s: float = 1.0,
        poll_s: float = 0.5,
    ) -> None:
        self.startup_timeout_s = startup_timeout_s
        self.restart_delay_s = restart_delay_s
        self.poll_s = poll_s
        self._workers = [
            _Supervised(launch, log_dir / f"worker{i}.log" if log_dir else None, delay_s=restart_delay_s)
            for i, launch in enumerate(launches)
        ]
        self._logs: list[IO[bytes]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def urls(self) -> list[str]:
        return [w.launch.url for w in self._workers]

    def restarts(self) -> list[int]:
        with self._lock:
            return [w.restarts for w in self._workers]

    def pids(self) -> list[int | None]:
        with self._lock:
            return [w.process.pid if w.process else None for w in self._workers]

    @contextlib.contextmanager
    def running(self) -> Iterator[Supervisor]:
        """Start every worker, wait until all are healthy, watch them; stop them all on the way out."""
        try:
            count = len(self._workers)
            with self._lock:
                for i, worker in enumerate(self._workers, 1):
                    self._start(worker)
                    assert worker.process is not None
                    log.info(
                        "worker %d/%d starting at %s (pid %d%s): %s",
                        i,
                        count,
                        worker.launch.url,
                        worker.process.pid,
                        f", output in {worker.log_path}" if worker.log_path else "",
                        " ".join(worker.launch.command[:4]),
                    )
            deadline = time.monotonic() + self.startup_timeout_s
            for i, worker in enumerate(self._workers, 1):
                assert worker.process is not None
                wait_healthy(
                    worker.process, worker.launch.url, deadline, self.startup_timeout_s, worker.log_path
                )
                log.info("worker %d/%d ready at %s", i, count, worker.launch.url)
            self._thread = threading.Thread(target=self.watch, name="worker-supervisor", daemon=True)
            self._thread.start()
            yield self
        finally:
            self._stopping.set()
            if self._thread is not None:
                self._thread.join()
            with self._lock:
                stop_processes([w.process for w in self._workers if w.process is not None])
            for f in self._logs:
                f.close()

    def watch(self) -> None:
        """Until stopped: restart every worker that exited, after its back-off delay."""
        while not self._stopping.wait(self.poll_s):
            now = time.monotonic()
            with self._lock:
                for worker in self._workers:
                    self._check(worker, now)

    def _check(self, worker: _Supervised, now: float) -> None:
        process = worker.process
        if worker.restart_at is None and process is not None and process.poll() is not None:
            if now - worker.started >= STABLE_AFTER_S:
                worker.delay_s = self.restart_delay_s
            worker.restart_at = now + worker.delay_s
            log.warning(
                "worker %s exited with code %s; restarting it in %.0f s%s",
                worker.launch.url,
                process.returncode,
                worker.delay_s,
                f" (its output: {worker.log_path})" if worker.log_path else "",
            )
            worker.delay_s = min(2 * worker.delay_s, MAX_RESTART_DELAY_S)
        elif worker.restart_at is not None and now >= worker.restart_at:
            worker.restart_at = None
            worker.restarts += 1
            self._start(worker)

    def _start(self, worker: _Supervised) -> None:
        output = None
        if worker.log_path is not None:
            output = open(worker.log_path, "ab")  # noqa: SIM115 (closed when the supervisor stops)
            self._logs.append(output)
        env = {**os.environ, **worker.launch.env} if worker.launch.env else None
        worker.process = spawn(worker.launch.command, output, env=env)
        worker.started = time.monotonic()

    def all_healthy(self) -> bool:
        return all(healthy(url) for url in self.urls)
