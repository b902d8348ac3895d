"""When loading a prefix back from a lower tier pays: measured copy time against measured prefill time.

Pure Python, and only the policy: the tiers supply their measured bandwidths, the engine its measured
prefill rate (``engine.step_times``, the one measure of its steps, read through ``prefill_rate``).
Before a rate is known (a fresh engine), loading is assumed to pay: on every machine this engine
targets a page copy is orders of magnitude cheaper than its recompute, and the first large forward
pass measures the rate.

``per_token`` publishes the same figures (``GET /load_profile``), so the gateway weighs a lower-tier
hit by what this engine will actually do with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cache.planning.load_profile import KVLoadCost


@dataclass(frozen=True)
class LoadCost:
    min_load_tokens: int  # a shorter lower-tier prefix is recomputed (not worth a copy's fixed cost)
    prefill_rate: Callable[[], float | None]  # the engine's measured prefill tokens/s; None before one

    def load_seconds(
        self, host_bytes: int, disk_bytes: int, copy_bytes_per_s: float | None, disk_bytes_per_s: float | None
    ) -> float:
        """Estimated time to bring these bytes to the device (0 for an unmeasured path)."""
        seconds = (host_bytes + disk_bytes) / copy_bytes_per_s if copy_bytes_per_s else 0.0
        if disk_bytes and disk_bytes_per_s:
            seconds += disk_bytes / disk_bytes_per_s
        return seconds

    def per_token(
        self, bytes_per_token: float, copy_bytes_per_s: float | None, disk_bytes_per_s: float | None
    ) -> KVLoadCost:
        """Seconds per prompt token to load from each tier (as ``load_seconds`` adds them up) and to
        recompute; None where a rate is not measured yet."""
        host = bytes_per_token / copy_bytes_per_s if copy_bytes_per_s else None
        disk = host + bytes_per_token / disk_bytes_per_s if host is not None and disk_bytes_per_s else None
        rate = self.prefill_rate()
        return KVLoadCost(1 / rate if rate else None, host, disk, self.min_load_tokens)

    def pays(self, num_tokens: int, load_seconds: float) -> bool:
        """All-or-nothing for one request's lower-tier prefix of ``num_tokens`` tokens."""
        if num_tokens < self.min_load_tokens:
            return False
        rate = self.prefill_rate()
        return rate is None or load_seconds < num_tokens / rate
