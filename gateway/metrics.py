"""Prometheus metrics and the in-memory figures behind /stats. One registry per app (no globals).

Names are documented in docs/metrics.md; hit rate = cached / prompt tokens, predicted (from the
index, at routing time) and actual (from the worker's ``usage.prompt_tokens_details.cached_tokens``).
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections import deque
from dataclasses import asdict, dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)


@dataclass
class RequestRecord:
    """One finished request as /stats and the dashboard show it (never prompt text)."""

    time: float
    request_id: str
    tenant: str
    worker: str
    policy: str
    reason: str
    status: int
    stream: bool
    prompt_tokens: int
    predicted_cached_tokens: int
    cached_tokens: int | None  # None when the worker did not report usage
    completion_tokens: int
    ttft_s: float | None
    latency_s: float
    error: str | None = None


class GatewayMetrics:
    def __init__(self, recent: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("prefixgate_requests", "Requests proxied", ["worker", "status"], registry=r)
        self.prompt_tokens = Counter("prefixgate_prompt_tokens", "Prompt tokens routed", registry=r)
        self.cached_predicted = Counter(
            "prefixgate_cached_tokens_predicted", "Prompt tokens the index predicted cached", registry=r
        )
        self.cached_actual = Counter(
            "prefixgate_cached_tokens_actual", "Prompt tokens workers reported cached (usage)", registry=r
        )
        self.decisions = Counter(
            "prefixgate_routing_decisions", "Routing decisions", ["policy", "reason", "worker"], registry=r
        )
        self.retries = Counter("prefixgate_retries", "Requests retried on another worker", registry=r)
        self.ttft = Histogram(
            "prefixgate_ttft_seconds", "Time to first byte of output", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "prefixgate_request_seconds", "End-to-end request latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.worker_load = Gauge(
            "prefixgate_worker_load", "In-flight requests per worker", ["worker"], registry=r
        )
        self.worker_healthy = Gauge(
            "prefixgate_worker_healthy", "1 if the worker is available", ["worker"], registry=r
        )
        self.index_blocks = Gauge(
            "prefixgate_index_blocks",
            "Blocks per worker and tier in the index",
            ["worker", "tier"],
            registry=r,
        )
        self.store_degraded = Gauge(
            "prefixgate_store_degraded", "1 while the shared store is unreachable", registry=r
        )
        self.recent: deque[RequestRecord] = deque(maxlen=recent)
        self.totals: Tally[str] = Tally()
        self.reasons: Tally[str] = Tally()
        self.started = time.time()

    def record(self, rec: RequestRecord) -> None:
        self.recent.append(rec)
        self.requests.labels(rec.worker, str(rec.status)).inc()
        self.latency.observe(rec.latency_s)
        if rec.ttft_s is not None:
            self.ttft.observe(rec.ttft_s)
        t = self.totals
        t["requests"] += 1
        t["errors"] += rec.status >= 400
        if rec.status < 400:
            t["prompt_tokens"] += rec.prompt_tokens
            t["predicted_cached_tokens"] += rec.predicted_cached_tokens
            self.prompt_tokens.inc(rec.prompt_tokens)
            self.cached_predicted.inc(rec.predicted_cached_tokens)
            if rec.cached_tokens is not None:
                t["reported_prompt_tokens"] += rec.prompt_tokens
                t["cached_tokens"] += rec.cached_tokens
                self.cached_actual.inc(rec.cached_tokens)
            t["completion_tokens"] += rec.completion_tokens

    def decision(self, policy: str, reason: str, worker: str) -> None:
        self.decisions.labels(policy, reason, worker).inc()
        self.reasons[f"{policy}/{reason}"] += 1

    def summary(self) -> dict:
        t = self.totals
        prompt, reported = t["prompt_tokens"], t["reported_prompt_tokens"]
        ttfts = sorted(r.ttft_s for r in self.recent if r.ttft_s is not None)
        return {
            "requests": t["requests"],
            "errors": t["errors"],
            "prompt_tokens": prompt,
            "completion_tokens": t["completion_tokens"],
            "cached_tokens": t["cached_tokens"],
            "predicted_cached_tokens": t["predicted_cached_tokens"],
            "hit_rate_actual": t["cached_tokens"] / reported if reported else 0.0,
            "hit_rate_predicted": t["predicted_cached_tokens"] / prompt if prompt else 0.0,
            "prompt_tokens_saved": t["cached_tokens"],
            "ttft_p50_s": _pct(ttfts, 0.5),
            "ttft_p99_s": _pct(ttfts, 0.99),
            "routing": dict(self.reasons),
            "uptime_s": time.time() - self.started,
        }

    def recent_requests(self, limit: int = 50) -> list[dict]:
        return [asdict(r) for r in list(self.recent)[-limit:]]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]
