"""The P:D advice for a recorded run: the gateway's arithmetic (``cache.planning.pd_advice``) on what
one benchmark run shows from the client side. An estimate, and labelled so:

* workload: the run's request rate, uncached prompt tokens (usage ``prompt_tokens - cached_tokens``)
  and output tokens;
* prefill speed: from TTFT against uncached prompt tokens, the slope of a least-squares line when the
  prompts vary in length (the intercept takes the fixed costs: network, scheduling), else total
  uncached tokens over total TTFT. Queueing and decode steps sharing the worker inflate TTFT, so this
  understates the speed of a dedicated prefill worker;
* decode speed: one point, the run's mean TPOT at its decode concurrency (sequences past their first
  token, on average, divided among ``workers`` workers, at least 1). Larger batches were not seen, so
  the decode capacity is a lower bound.

A gateway sizes from every engine's measured step times instead (``GET /load_profile``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from cache.planning.load_profile import DecodePoint, LoadProfile
from cache.planning.pd_advice import SLO, Workload, advise
from loadgen.client import RequestRecord
from loadgen.metrics import tpot_s

DEFAULT_SLO = SLO(ttft_s=0.5, itl_s=0.05)  # the gateway's defaults (Dynamo's planner's)
LABEL = "P:D advice (an estimate from this one run)"


def advice_slo(ttft_ms: float | None, itl_ms: float | None) -> SLO:
    """The run's ``--slo ttft:MS tpot:MS`` (TPOT stands for the ITL), else the defaults."""
    return SLO(
        DEFAULT_SLO.ttft_s if ttft_ms is None else ttft_ms / 1e3,
        DEFAULT_SLO.itl_s if itl_ms is None else itl_ms / 1e3,
    )


def run_workload(done: Sequence[RequestRecord], duration_s: float) -> Workload:
    uncached = sorted(_uncached(r) for r in done)
    n = len(done)
    return Workload(
        request_rate=n / duration_s,
        mean_prefill_tokens=sum(uncached) / n,
        p90_prefill_tokens=uncached[min(n - 1, int(0.9 * n))],
        mean_output_tokens=sum(r.output_tokens for r in done) / n,
    )


def prefill_rate(done: Sequence[RequestRecord]) -> tuple[float | None, str]:
    """(prompt tokens per second, how it was estimated)."""
    pairs = [(_uncached(r), r.ttft_s) for r in done if r.ttft_s is not None and r.ttft_s > 0]
    if not pairs:
        return None, "no TTFT recorded"
    xs, ys = [float(x) for x, _ in pairs], [y for _, y in pairs]
    n, mean_x, mean_y = len(pairs), sum(xs) / len(xs), sum(ys) / len(ys)
    var_x = sum((x - mean_x) ** 2 for x in xs) / n
    if mean_x > 0 and var_x**0.5 >= 0.1 * mean_x:  # the prompts vary enough for a slope to mean something
        slope = sum((x - mean_x) * (y - mean_y) for x, y in pairs) / (n * var_x)
        if slope > 0:
            return 1.0 / slope, "slope of TTFT over uncached prompt tokens"
    if sum(xs) <= 0:
        return None, "every prompt was cached"
    return sum(xs) / sum(ys), "uncached prompt tokens over TTFT"


def decode_point(done: Sequence[RequestRecord], duration_s: float, workers: int) -> DecodePoint | None:
    tpots = [t for t in (tpot_s(r) for r in done) if t is not None and t > 0]
    if not tpots:
        return None
    decoding_s = sum(r.latency_s - r.ttft_s for r in done if r.latency_s is not None and r.ttft_s is not None)
    batch = max(1.0, decoding_s / duration_s / workers)
    return DecodePoint(batch, sum(tpots) / len(tpots), len(tpots))


def run_advice(
    records: Sequence[RequestRecord],
    duration_s: float,
    slo: SLO = DEFAULT_SLO,
    workers: int = 1,
    short_prompt_tokens: int = 256,
) -> dict[str, Any] | None:
    """The advice for the run's measured (non-warm-up, successful) requests, as JSON; None without any."""
    done = [r for r in records if r.success and not r.warmup]
    if not done or duration_s <= 0:
        return None
    workload = run_workload(done, duration_s)
    rate, method = prefill_rate(done)
    point = decode_point(done, duration_s, workers)
    profile = LoadProfile(rate, (point,) if point else ())
    advice = advise(workload, profile, slo, short_prompt_tokens=short_prompt_tokens)
    return {
        "estimate": "from one run: prefill speed from TTFT, decode speed at the run's concurrency only",
        "slo": {"ttft_ms": slo.ttft_s * 1e3, "itl_ms": slo.itl_s * 1e3},
        "workers": workers,
        "workload": asdict(workload),
        "prefill_estimate": method,
        "profile": profile.to_json(),
        **advice.to_json(),
    }


def format_advice(advice: dict[str, Any]) -> str:
    w, slo = advice["workload"], advice["slo"]
    lines = [
        f"{' ' + LABEL + ' ':-^60}",
        f"targets: TTFT <= {slo['ttft_ms']:.0f} ms, ITL <= {slo['itl_ms']:.0f} ms",
        f"workload: {w['request_rate']:.2f} req/s, {w['mean_prefill_tokens']:.0f} uncached prompt tokens "
        f"(p90 {w['p90_prefill_tokens']:.0f}), {w['mean_output_tokens']:.0f} output tokens",
    ]
    if advice["prefill_tokens_per_s_per_worker"] is not None:
        lines.append(
            f"prefill: {advice['prefill_tokens_per_s_per_worker']:.0f} tok/s per worker ({advice['prefill_estimate']})"
        )
    decode = advice["profile"]["decode"]
    if decode:
        lines.append(
            f"decode: {decode[0]['step_s'] * 1e3:.1f} ms per token at batch {decode[0]['batch']:.1f} per worker "
            f"({advice['workers']} worker(s) behind the target)"
        )
    if advice["prefill_workers"] is None:
        lines.append(advice["reason"])
    else:
        mixed = "no number of mixed workers" if advice["mixed_workers"] is None else advice["mixed_workers"]
        lines.append(
            f"needed: {advice['prefill_workers']} prefill + {advice['decode_workers']} decode, or {mixed} mixed"
        )
        verdict = "pays" if advice["disaggregation_pays"] else "does not pay"
        lines.append(f"disaggregation {verdict}: {advice['reason']}")
    lines += [f"note: {note}" for note in advice["notes"]]
    lines.append("-" * 60)
    return "\n".join(lines)


def _uncached(record: RequestRecord) -> int:
    prompt = record.prompt_tokens if record.prompt_tokens is not None else record.expected_prompt_tokens or 0
    return max(0, prompt - (record.cached_tokens or 0))
