"""Prometheus metrics of one engine worker, in a registry of its own (no process-global state).

Counters and histograms are updated as requests run; gauges read the engine's state when scraped,
so they cost nothing between scrapes. Reads from the event-loop thread race benignly with the engine
thread: each is a single int or ``len()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from engine.async_engine import GenerationChunk
    from engine.engine import LLMEngine

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class ServerMetrics:
    def __init__(self, engine: LLMEngine, prefix: str = "prefixgate_engine") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, p = self.registry, prefix
        model = engine.info.model_id
        self.requests = Counter(
            f"{p}_requests", "Finished requests by endpoint and finish reason", ["endpoint", "finish_reason"],
            registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter(
            f"{p}_cached_prompt_tokens", "Prompt tokens whose KV came from the prefix cache", registry=r
        )
        self.generation_tokens = Counter(f"{p}_generation_tokens", "Generated tokens", registry=r)
        self.time_to_first_token = Histogram(
            f"{p}_time_to_first_token_seconds", "Request arrival to first token", buckets=_LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            f"{p}_inter_token_latency_seconds", "Time between output tokens", buckets=_LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.e2e_latency = Histogram(
            f"{p}_e2e_request_latency_seconds", "Request arrival to last token", buckets=_E2E_BUCKETS,
            registry=r,
        )  # fmt: skip
        scheduler, pool, cache = engine.scheduler, engine.pool, engine.cache
        gauges = {
            "num_running_requests": ("Requests being computed", lambda: len(scheduler.running)),
            "num_waiting_requests": ("Requests queued for admission", lambda: len(scheduler.waiting)),
            "kv_pages_used": ("KV pages in use (requests and prefix cache)", lambda: pool.num_used),
            "kv_pages_free": ("KV pages on the free list", lambda: pool.num_free),
            "kv_pages_cached": ("KV pages owned by the prefix cache", lambda: cache.num_pages),
            "kv_pages_total": ("KV pool capacity in pages", lambda: pool.num_pages),
        }
        for name, (doc, read) in gauges.items():
            Gauge(f"{p}_{name}", doc, registry=r).set_function(read)
        Gauge(f"{p}_info", "Served model", ["model"], registry=r).labels(model).set(1)

    def record_request(
        self, endpoint: str, final: GenerationChunk | None, seconds: float, cancelled: bool = False
    ) -> None:
        """Count one request (``final``: its last chunk, None when it failed before any output)."""
        reason = final.finish_reason if final and final.finished else "abort" if cancelled else "error"
        self.requests.labels(endpoint, reason or "error").inc()
        if final is None:
            return
        self.prompt_tokens.inc(final.prompt_tokens)
        self.cached_tokens.inc(final.cached_tokens)
        self.generation_tokens.inc(final.completion_tokens)
        self.e2e_latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
