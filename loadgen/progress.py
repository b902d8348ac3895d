"""A live progress line for a run: requests done of the total, failures, req/s and prompt-cache hit rate.

On a terminal it rewrites one line (``\\r``) at most every ``interval_s``; elsewhere (CI logs, pipes) it
prints a plain line every ``interval_s * 5`` so a log stays readable. Always to stderr: stdout carries
the report.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from loadgen.client import RequestRecord


class Progress:
    def __init__(self, label: str, total: int, stream: TextIO | None = None, interval_s: float = 0.5) -> None:
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval_s = interval_s if self.tty else interval_s * 5
        self.started = time.perf_counter()
        self.last_print = float("-inf")
        self.done = self.failed = self.prompt_tokens = self.cached_tokens = 0

    def update(self, record: RequestRecord) -> None:
        """Count one finished measured request (warm-up requests are not passed here)."""
        self.done += 1
        self.failed += not record.success
        if record.success and record.prompt_tokens is not None and record.cached_tokens is not None:
            self.prompt_tokens += record.prompt_tokens
            self.cached_tokens += record.cached_tokens
        now = time.perf_counter()
        if now - self.last_print >= self.interval_s or self.done == self.total:
            self.last_print = now
            self._print(now)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.perf_counter()) - self.started, 1e-9)
        hit = f"{self.cached_tokens / self.prompt_tokens:.0%}" if self.prompt_tokens else "n/a"
        failed = f", {self.failed} failed" if self.failed else ""
        return (
            f"[{self.label}] {self.done}/{self.total} requests{failed}, "
            f"{self.done / elapsed:.2f} req/s, prompt-cache hit {hit}, {elapsed:.0f} s"
        )

    def close(self) -> None:
        if self.tty and self.done:
            self.stream.write("\n")
            self.stream.flush()

    def _print(self, now: float) -> None:
        self.stream.write(("\r" if self.tty else "") + self.line(now) + ("" if self.tty else "\n"))
        self.stream.flush()
