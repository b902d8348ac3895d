"""P:D advice: how many prefill and decode workers a workload needs to meet TTFT and ITL targets, how
many mixed workers the same load needs, and whether disaggregating pays.

Disaggregated (Dynamo's SLA planner, ``_compute_replica_requirements``; the decode side is its
``find_best_throughput_per_gpu`` on a measured curve instead of a profiled grid)::

    prefill workers = ceil(rate x prefill tokens x min(1, prefill correction) / prefill tokens/s per worker)
    batch*          = the largest measured decode batch whose step time <= ITL SLO / decode correction
    decode workers  = ceil(rate x output tokens / (batch* / step time(batch*)))

each at least ``min_workers`` (the planner's ``min_endpoint``). "Prefill tokens" are the prompt tokens
that need computing, i.e. prompt minus cached: a prefix-cache hit is prefill nobody pays for. As in the
planner, queueing is not modelled (the counts run every worker at its SLO-bound capacity), and a TTFT
the workers cannot reach alone (the mean prompt's prefill exceeds the TTFT SLO on an idle worker), or
an ITL a batch of one cannot reach, is an SLO that adding workers does not meet: the answer says so.

Mixed (each worker's time split, chunked prefill as Sarathi-Serve runs it): a worker decoding a batch
``b`` spends ``step(b)`` of every ITL window on the decode and the rest on prefill chunks, so it decodes
``b / ITL`` tokens/s and prefills ``(1 - step(b) / ITL) x prefill tokens/s``, and a prompt's TTFT is
stretched by the same share. The fewest workers ``N`` whose batch ``b = rate x output tokens x ITL / N``
leaves enough prefill share for the load and for the TTFT of the mean prompt is the mixed count.

Disaggregation does not pay when the uncached part of the prompt is short (below the threshold at
which the gateway lets the decode worker prefill locally, there is nothing to ship), when the whole
load fits in one mixed worker, or when mixed workers meet both SLOs with no more workers than P + D.
It pays when mixed workers cannot hold the TTFT while decoding within the ITL (a long prompt's prefill
squeezed into the slack of each decode step), or when P + D is fewer. KV transfer time is not modelled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import pairwise

from cache.planning.load_profile import LoadProfile

_EPS = 1e-9  # ceil(2.0000000001) must be 2: float noise is not a worker


@dataclass(frozen=True)
class Workload:
    request_rate: float  # requests per second arriving
    mean_prefill_tokens: float  # prompt tokens that need computing (prompt minus cached), per request
    p90_prefill_tokens: float
    mean_output_tokens: float


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    itl_s: float


@dataclass(frozen=True)
class Corrections:
    """Dynamo's correction factors: observed / expected TTFT and ITL (1: the measurements hold as they are)."""

    prefill: float = 1.0
    decode: float = 1.0


@dataclass(frozen=True)
class PDAdvice:
    prefill_workers: int | None  # None: no count meets the TTFT SLO (or nothing measured yet)
    decode_workers: int | None  # None: no count meets the ITL SLO
    mixed_workers: int | None  # None: mixed workers cannot meet both SLOs
    disaggregation_pays: bool
    reason: str  # one line
    notes: tuple[str, ...] = ()
    # the work, shown next to the answer
    prefill_tokens_per_s_needed: float = 0.0
    decode_tokens_per_s_needed: float = 0.0
    prefill_tokens_per_s_per_worker: float | None = None
    ttft_alone_s: float | None = None  # the mean prompt's prefill on an idle prefill worker
    decode_batch_at_itl: float | None = None
    decode_tokens_per_s_per_worker: float | None = None
    mixed_decode_batch: float | None = None
    mixed_prefill_share: float | None = None  # of every step, what a mixed worker has left for prefill

    def to_json(self) -> dict:
        return asdict(self)


def advise(
    workload: Workload,
    profile: LoadProfile,
    slo: SLO,
    corrections: Corrections = Corrections(),
    short_prompt_tokens: int = 256,
    min_workers: int = 1,
) -> PDAdvice:
    """The advice for ``workload`` on workers as fast as ``profile`` says (one worker's figures)."""
    prefill_rate = profile.prefill_tokens_per_s
    points = [(p.batch, p.step_s) for p in profile.decode]
    itl = slo.itl_s / corrections.decode if corrections.decode > 0 else slo.itl_s  # the planner's guard
    prefill_need = workload.request_rate * workload.mean_prefill_tokens * min(1.0, corrections.prefill)
    decode_need = workload.request_rate * workload.mean_output_tokens
    shown = dict(prefill_tokens_per_s_needed=prefill_need, decode_tokens_per_s_needed=decode_need)
    if prefill_rate is None or not points:
        missing = "prefill rate" if prefill_rate is None else "decode step time"
        return PDAdvice(None, None, None, False, f"no {missing} measured yet", **shown)
    shown.update(prefill_tokens_per_s_per_worker=prefill_rate)
    notes = []
    ttft_alone = workload.mean_prefill_tokens / prefill_rate
    shown.update(ttft_alone_s=ttft_alone)
    p90_alone = workload.p90_prefill_tokens / prefill_rate
    if ttft_alone <= slo.ttft_s < p90_alone:
        notes.append(
            f"p90 prompts ({workload.p90_prefill_tokens:.0f} uncached tokens) take {p90_alone * 1e3:.0f} ms "
            f"to prefill alone: over the TTFT SLO on any number of workers"
        )

    batch = largest_batch_within(points, itl, profile.max_batch)
    if batch is not None:
        decode_rate = batch / step_time(points, batch)
        shown.update(decode_batch_at_itl=batch, decode_tokens_per_s_per_worker=decode_rate)
        if batch >= points[-1][0] and (profile.max_batch is None or batch < profile.max_batch):
            notes.append(f"decode measured up to batch {batch:.1f}: larger batches may fit the ITL too")
    if ttft_alone > slo.ttft_s or batch is None:
        what = (
            f"TTFT: the mean prompt's {workload.mean_prefill_tokens:.0f} uncached tokens take "
            f"{ttft_alone * 1e3:.0f} ms to prefill alone"
            if ttft_alone > slo.ttft_s
            else f"ITL: a batch of {points[0][0]:.0f} already steps in {points[0][1] * 1e3:.1f} ms"
        )
        return PDAdvice(
            None,
            None,
            None,
            False,
            f"the SLO cannot be met by adding workers ({what})",
            tuple(notes),
            **shown,
        )

    prefill_workers = max(min_workers, _ceil(prefill_need / prefill_rate))
    decode_workers = max(min_workers, _ceil(decode_need / decode_rate))
    mixed = _mixed(workload, points, batch, prefill_rate, prefill_need, decode_need, itl, slo.ttft_s)
    mixed_workers = None if mixed is None else max(min_workers, mixed[0])
    if mixed is not None:
        shown.update(mixed_decode_batch=mixed[1], mixed_prefill_share=mixed[2])
    split = prefill_workers + decode_workers
    if workload.mean_prefill_tokens < short_prompt_tokens:
        pays, reason = (
            False,
            (
                f"the uncached prompt part is short ({workload.mean_prefill_tokens:.0f} < {short_prompt_tokens} "
                "tokens): decode workers prefill it locally, there is nothing worth shipping"
            ),
        )
    elif mixed_workers is None:
        pays, reason = (
            True,
            (
                "mixed workers cannot hold the TTFT while decoding within the ITL: the prefill only gets "
                "what each decode step leaves"
            ),
        )
    elif mixed_workers == 1:
        pays, reason = False, "the whole load fits in one mixed worker"
    elif split < mixed_workers:
        pays, reason = (
            True,
            f"{prefill_workers}P + {decode_workers}D = {split} workers against {mixed_workers} mixed",
        )
    else:
        pays, reason = False, f"{mixed_workers} mixed workers meet both SLOs; P + D would take {split}"
    return PDAdvice(prefill_workers, decode_workers, mixed_workers, pays, reason, tuple(notes), **shown)


def step_time(points: list[tuple[float, float]], batch: float) -> float:
    """Decode step seconds at ``batch``: linear between measured points, flat outside them (a smaller
    batch is taken to be no faster than the smallest measured: conservative)."""
    if batch <= points[0][0]:
        return points[0][1]
    for (b0, t0), (b1, t1) in pairwise(points):
        if batch <= b1:
            return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
    return points[-1][1]


def largest_batch_within(
    points: list[tuple[float, float]], itl_s: float, max_batch: int | None
) -> float | None:
    """The largest batch, within the measured range and ``max_batch``, whose step takes at most ``itl_s``;
    None when even the smallest measured batch is slower. Scans down from the top, as the planner does,
    because a measured curve need not be monotonic. Nothing is extrapolated beyond the largest point."""
    top = points[-1][0] if max_batch is None else min(points[-1][0], max_batch)
    for (b0, t0), (b1, t1) in reversed(list(pairwise(points))):
        if b0 > top:
            continue
        if b1 > top:  # the segment crosses the cap: cut it there
            b1, t1 = top, t0 + (t1 - t0) * (top - b0) / (b1 - b0)
        if t1 <= itl_s:
            return b1
        if t0 <= itl_s:  # t0 <= itl < t1: where the segment crosses the ITL
            return b0 + (b1 - b0) * (itl_s - t0) / (t1 - t0)
    b0, t0 = points[0]
    return min(b0, top) if t0 <= itl_s else None


def _mixed(
    workload: Workload,
    points: list[tuple[float, float]],
    max_batch: float,
    prefill_rate: float,
    prefill_need: float,
    decode_need: float,
    itl_s: float,
    ttft_s: float,
) -> tuple[int, float, float] | None:
    """(workers, decode batch each, prefill share of each step) for mixed workers, or None. A worker's
    batch stays within ``max_batch`` (the measured range under the ITL), as a decode worker's does."""
    # The most prefill share a worker ever gets: decoding the smallest measured batch (or nothing).
    floor_share = 1.0 - points[0][1] / itl_s if decode_need > 0 else 1.0
    share_for_ttft = workload.mean_prefill_tokens / (ttft_s * prefill_rate)
    if floor_share <= 0 or floor_share < share_for_ttft:
        return None

    def split(n: int) -> tuple[bool, float, float]:
        batch = decode_need * itl_s / n  # each sequence gets one token per ITL window
        share = 1.0 - step_time(points, batch) / itl_s if batch > 0 else 1.0
        ok = (
            batch <= max_batch * (1 + _EPS)
            and share > 0
            and share >= share_for_ttft
            and n * share * prefill_rate >= prefill_need * (1 - _EPS)
        )
        return ok, batch, share

    # Enough workers that each decodes at most the smallest measured batch always fits (floor_share).
    hi = max(1, _ceil(decode_need * itl_s / points[0][0]), _ceil(prefill_need / (floor_share * prefill_rate)))
    lo = 1
    while lo < hi:  # the fewest workers that fit: more workers only shrink each one's batch
        mid = (lo + hi) // 2
        if split(mid)[0]:
            hi = mid
        else:
            lo = mid + 1
    _, batch, share = split(hi)
    return hi, batch, share


def _ceil(x: float) -> int:
    return max(0, math.ceil(x - _EPS))
