"""The gateway's P:D advice: how many prefill, decode and mixed workers the load it sees needs.

Inputs, all measured here: the workload from this gateway's own request records over the last
``window_s`` seconds (arrival rate; prompt tokens some worker had to compute; output tokens), and each
worker's speed from its ``GET /load_profile`` (``cache.planning.load_profile``), read in the periodic
worker probe. The arithmetic is ``cache.planning.pd_advice`` (Dynamo's SLA planner's). Shown next to
what is deployed, on /stats (``pd_advice``), /metrics and the dashboard; it advises, it scales nothing.

The planner's correction factors (observed / expected TTFT and ITL) calibrate an offline profile
against production; here the profile is measured on the serving workers and the prefill input is
already the uncached part of each prompt, so they stay 1.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict

from cache.planning.load_profile import DecodePoint, LoadProfile
from cache.planning.pd_advice import SLO, Workload, advise
from gateway.metrics import GatewayMetrics, RequestRecord
from gateway.workers import Worker

ROLES = ("prefill", "decode", "mixed")
# Whose measurement stands for a pool's worker: its own role first, then mixed workers (they do both).
_PREFERRED = {"prefill": ("prefill", "mixed", "decode"), "decode": ("decode", "mixed", "prefill")}
_SHOWN_APART = {
    "prefill_workers",
    "decode_workers",
    "mixed_workers",
    "disaggregation_pays",
    "reason",
    "notes",
}


def uncached_tokens(record: RequestRecord) -> int:
    """Prompt tokens some worker computed for this request. A decode worker reports the KV it received
    from its prefill worker as cached, so for a remotely prefilled request the index's view of what the
    decode worker lacked stands in (an upper bound: the prefill worker's own cache hits go unreported)."""
    if record.pd_path == "remote" or record.cached_tokens is None:
        cached = record.predicted_cached_tokens
    else:
        cached = record.cached_tokens
    return max(0, record.prompt_tokens - cached)


def observed_workload(
    records: Iterable[RequestRecord], now: float, window_s: float, complete_since: float
) -> tuple[Workload, int, float] | None:
    """(workload, requests, seconds observed) over the last ``window_s`` seconds, or None without a
    served request. ``complete_since``: records are complete from then on (the gateway's start, or the
    oldest record a full ring buffer still holds), so the arrival rate never counts a span it forgot."""
    start = max(now - window_s, complete_since)
    served = [r for r in records if r.time >= start and r.status < 400]
    span = now - start
    if not served or span <= 0:
        return None
    prefill = sorted(uncached_tokens(r) for r in served)
    n = len(served)
    workload = Workload(
        request_rate=n / span,
        mean_prefill_tokens=sum(prefill) / n,
        p90_prefill_tokens=prefill[min(n - 1, int(0.9 * n))],
        mean_output_tokens=sum(r.completion_tokens for r in served) / n,
    )
    return workload, n, span


def pooled_profile(workers: Sequence[Worker]) -> tuple[LoadProfile, int]:
    """One worker's speed as the advice takes it, and how many workers measured anything: the mean
    prefill rate of the workers that prefill (prefill workers, else mixed, else any), and the decode
    points of those that decode, averaged per batch bucket (weighted by the steps behind each)."""
    measured = [w for w in workers if w.load_profile is not None and w.load_profile.measured]

    def pick(pool: str) -> list[LoadProfile]:
        for role in _PREFERRED[pool]:
            profiles = [w.load_profile for w in measured if w.role == role and w.load_profile is not None]
            if any(p.prefill_tokens_per_s if pool == "prefill" else p.decode for p in profiles):
                return profiles
        return []

    rates = [p.prefill_tokens_per_s for p in pick("prefill") if p.prefill_tokens_per_s is not None]
    deciders = pick("decode")
    buckets: dict[int, list[DecodePoint]] = {}
    for profile in deciders:
        for point in profile.decode:
            buckets.setdefault(int(point.batch).bit_length(), []).append(point)
    decode = []
    for _, points in sorted(buckets.items()):
        steps = sum(max(1, p.steps) for p in points)
        decode.append(
            DecodePoint(
                sum(p.batch * max(1, p.steps) for p in points) / steps,
                sum(p.step_s * max(1, p.steps) for p in points) / steps,
                steps,
            )
        )
    caps = [p.max_batch for p in deciders if p.max_batch is not None]
    profile = LoadProfile(sum(rates) / len(rates) if rates else None, tuple(decode), min(caps, default=None))
    return profile, len(measured)


def deployed(workers: Iterable[Worker]) -> dict[str, int]:
    """Available workers per role: what serves now."""
    counts = dict.fromkeys(ROLES, 0)
    for w in workers:
        if w.available:
            counts[w.role if w.role in counts else "mixed"] += 1
    return counts


class PDAdvisor:
    def __init__(self, slo: SLO, short_prompt_tokens: int, window_s: float = 60.0) -> None:
        """``short_prompt_tokens``: below this many uncached tokens a decode worker prefills locally."""
        self.slo, self.short_prompt_tokens, self.window_s = slo, short_prompt_tokens, window_s

    def refresh(self, workers: Sequence[Worker], metrics: GatewayMetrics, now: float) -> dict:
        """The advice for /stats (JSON), with the gauges set to it."""
        recent: deque[RequestRecord] = metrics.recent
        full = recent.maxlen is not None and len(recent) == recent.maxlen
        complete_since = recent[0].time if full else metrics.started
        observed = observed_workload(recent, now, self.window_s, complete_since)
        profile, measured = pooled_profile(workers)
        have = deployed(workers)
        out: dict = {
            "slo": {"ttft_ms": self.slo.ttft_s * 1e3, "itl_ms": self.slo.itl_s * 1e3},
            "deployed": have,
            "profile": {**profile.to_json(), "workers_measured": measured},
        }
        if observed is None:
            needed = dict.fromkeys(ROLES)
            out.update(
                needed=needed,
                disaggregation_pays=False,
                reason=f"no request served in the last {self.window_s:.0f} s",
                workload=None,
            )
        else:
            workload, requests, span = observed
            advice = advise(workload, profile, self.slo, short_prompt_tokens=self.short_prompt_tokens)
            needed = {
                "prefill": advice.prefill_workers,
                "decode": advice.decode_workers,
                "mixed": advice.mixed_workers,
            }
            figures = advice.to_json()
            out.update(
                needed=needed,
                disaggregation_pays=advice.disaggregation_pays,
                reason=advice.reason,
                notes=list(advice.notes),
                workload={**asdict(workload), "requests": requests, "window_s": span},
                figures={k: v for k, v in figures.items() if k not in _SHOWN_APART},
            )
        for role in ROLES:
            value = needed[role]
            metrics.pd_advice_workers.labels(role).set(float("nan") if value is None else value)
            metrics.pd_deployed_workers.labels(role).set(have[role])
        return out
