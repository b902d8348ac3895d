"""Benchmark metrics, defined as SGLang's and vLLM's ``bench_serving`` define them.

Per successful request (``client.RequestRecord``):
- TTFT: send -> first chunk with non-empty content (SGLang ``async_request_openai_*``).
- E2E latency: send -> last line of the stream (SGLang: ``latency`` is taken at every line, [DONE] too).
- TPOT: ``(latency - ttft) / (output_tokens - 1)``, only for ``output_tokens > 1``; for goodput a
  request with one output token counts as TPOT 0 (vLLM ``calculate_metrics``: ``all_tpots``).
- ITL: every gap between consecutive content chunks, pooled over all requests.
- output tokens: ``usage.completion_tokens`` (both benchmarks read it from the final usage chunk).
Aggregates: mean, median, std and ``np.percentile`` (linear interpolation) in ms, 0 for an empty list
(their ``np.mean(x or 0)``); throughputs divide by the benchmark duration; goodput = requests meeting
every SLO (``value <= slo``) per second (vLLM ``request_goodput``); concurrency = sum(E2E) / duration
(SGLang); cache-hit rate = sum(cached_tokens) / sum(prompt_tokens) from usage; recomputed tokens =
sum(prompt_tokens - cached_tokens), and of the cached ones those a worker fetched from a peer (our
engine's ``usage.prompt_tokens_details.kv_fetched_tokens``, docs/kv-transfer.md; None when no worker
reported any).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadgen.client import RequestRecord

DEFAULT_PERCENTILES: tuple[float, ...] = (90.0, 95.0, 99.0)
SLO_NAMES = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class SLO:
    """Service-level objectives in milliseconds; None: not constrained."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @classmethod
    def parse(cls, items: Iterable[str]) -> SLO:
        """``["ttft:500", "tpot:50"]`` or ``["ttft:500 tpot:50"]`` (vLLM's ``--goodput KEY:VALUE`` pairs)."""
        values: dict[str, float] = {}
        for item in items:
            for pair in item.replace(",", " ").split():
                name, sep, value = pair.partition(":")
                if not sep or name not in SLO_NAMES:
                    raise ValueError(
                        f"bad SLO {pair!r}: expected NAME:MS with NAME one of {', '.join(SLO_NAMES)}"
                    )
                if float(value) < 0:
                    raise ValueError(f"bad SLO {pair!r}: the value must be non-negative milliseconds")
                values[name] = float(value)
        return cls(values.get("ttft"), values.get("tpot"), values.get("e2el"))

    @property
    def empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.e2el_ms is None


def tpot_s(record: RequestRecord) -> float | None:
    """None for one output token (excluded from TPOT statistics, counted as 0 for goodput)."""
    if record.output_tokens <= 1 or record.ttft_s is None or record.latency_s is None:
        return None
    return (record.latency_s - record.ttft_s) / (record.output_tokens - 1)


def meets_slo(record: RequestRecord, slo: SLO) -> bool:
    observed = {
        "ttft_ms": record.ttft_s,
        "tpot_ms": tpot_s(record) or 0.0,
        "e2el_ms": record.latency_s,
    }
    for name, limit in (("ttft_ms", slo.ttft_ms), ("tpot_ms", slo.tpot_ms), ("e2el_ms", slo.e2el_ms)):
        value = observed[name]
        if limit is not None and (value is None or value * 1000.0 > limit):
            return False
    return True


def percentile_key(p: float) -> str:
    """vLLM's spelling: 99 -> "99", 99.9 -> "99.9"."""
    return str(int(p)) if float(p).is_integer() else str(p)


def summarize(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    """mean/median/std/p* in ms, 0 for an empty list, as ``np.mean(values or 0)`` gives there."""
    data = np.asarray(values_s if len(values_s) else [0.0], dtype=np.float64) * 1000.0
    out = {
        f"mean_{name}_ms": float(np.mean(data)),
        f"median_{name}_ms": float(np.median(data)),
        f"std_{name}_ms": float(np.std(data)),
    }
    for p in percentiles:
        out[f"p{percentile_key(p)}_{name}_ms"] = float(np.percentile(data, p))
    return out


def compute_metrics(
    records: Iterable[RequestRecord],
    duration_s: float,
    slo: SLO | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> dict[str, Any]:
    """Aggregate the measured (non-warm-up) records of one run over ``duration_s`` seconds."""
    measured = [r for r in records if not r.warmup]
    done = [r for r in measured if r.success]
    ttfts = [r.ttft_s for r in done if r.ttft_s is not None]
    e2els = [r.latency_s for r in done if r.latency_s is not None]
    tpots = [t for t in (tpot_s(r) for r in done) if t is not None]
    itls = [gap for r in done for gap in r.itl_s]
    input_tokens = [
        r.prompt_tokens if r.prompt_tokens is not None else r.expected_prompt_tokens or 0 for r in done
    ]
    total_input = int(sum(input_tokens))
    total_output = int(sum(r.output_tokens for r in done))
    duration_s = max(duration_s, 1e-9)

    result: dict[str, Any] = {
        "duration": duration_s,
        "num_requests": len(measured),
        "completed": len(done),
        "failed": len(measured) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration_s,
        "input_throughput": total_input / duration_s,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
        "concurrency": float(np.sum(e2els)) / duration_s if e2els else 0.0,
    }
    result.update(summarize("ttft", ttfts, percentiles))
    result.update(summarize("tpot", tpots, percentiles))
    result.update(summarize("itl", itls, percentiles))
    result["max_itl_ms"] = float(max(itls) * 1000.0) if itls else 0.0
    result.update(summarize("e2el", e2els, percentiles))
    for stat in ("mean", "median", "std", "p99"):  # SGLang's spelling of the same numbers
        result[f"{stat}_e2e_latency_ms"] = result.get(f"{stat}_e2el_ms")

    if slo is not None and not slo.empty:
        good = sum(1 for r in done if meets_slo(r, slo))
        result["goodput"] = result["request_goodput"] = good / duration_s
        result["good_requests"] = good
    else:
        result["goodput"] = result["request_goodput"] = None

    with_usage = [r for r in done if r.prompt_tokens is not None]
    prompt_total = sum(r.prompt_tokens or 0 for r in with_usage)
    cached_total = sum(r.cached_tokens or 0 for r in with_usage)
    result["total_prompt_tokens_usage"] = prompt_total
    result["total_cached_tokens"] = cached_total
    result["cached_tokens_reported"] = sum(1 for r in with_usage if r.cached_tokens is not None)
    result["cache_hit_rate"] = cached_total / prompt_total if prompt_total else None
    result["total_recomputed_tokens"] = sum(
        max(0, (r.prompt_tokens or 0) - r.cached_tokens) for r in with_usage if r.cached_tokens is not None
    )
    fetched = [r.kv_fetched_tokens for r in with_usage if r.kv_fetched_tokens is not None]
    result["total_kv_fetched_tokens"] = sum(fetched) if fetched else None
    result["kv_fetches_reported"] = len(fetched)

    lateness = [r.lateness_s for r in measured if r.lateness_s is not None]
    result["mean_lateness_ms"] = float(np.mean(lateness) * 1000.0) if lateness else None
    result["p99_lateness_ms"] = float(np.percentile(lateness, 99) * 1000.0) if lateness else None
    result["max_lateness_ms"] = float(np.max(lateness) * 1000.0) if lateness else None
    errors = [r.error for r in measured if not r.success]
    result["first_errors"] = errors[:5]
    return result
