"""Prometheus metrics of one engine worker, in a registry of its own (no process-global state).

Counters and histograms are updated as requests run; gauges read the engine's published stats
snapshot (``AsyncEngine.stats``) when scraped, so they cost nothing between scrapes and never touch
the scheduler or KV pool from the event-loop thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine, GenerationChunk
    from engine.transfer.fetcher import FetchOutcome

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


class _LoadedTokens(Collector):
    """Prompt tokens loaded back from a lower tier instead of recomputed, by tier: a counter read off the
    engine's stats snapshot at scrape time (the step thread counts; nothing here touches the engine)."""

    def __init__(self, name: str, engine: AsyncEngine) -> None:
        self.name, self.engine = name, engine

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self.engine.stats
        family = CounterMetricFamily(
            self.name, "Prompt tokens loaded back from a lower KV tier", labels=["tier"]
        )
        family.add_metric(["host"], stats.tokens_loaded_from_host)
        family.add_metric(["disk"], stats.tokens_loaded_from_disk)
        yield family


class ServerMetrics:
    def __init__(self, engine: AsyncEngine, prefix: str = "prefixgate_engine") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, p = self.registry, prefix
        model = engine.info.model_id
        self.requests = Counter(
            f"{p}_requests",
            "Finished requests by endpoint and finish reason",
            ["endpoint", "finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter(
            f"{p}_cached_prompt_tokens", "Prompt tokens whose KV came from the prefix cache", registry=r
        )
        self.computed_prompt_tokens = Counter(
            f"{p}_computed_prompt_tokens",
            "Prompt tokens recomputed (not from the prefix cache, nor fetched into it)",
            registry=r,
        )
        self.generation_tokens = Counter(f"{p}_generation_tokens", "Generated tokens", registry=r)
        # KV transfer: fetch plans carried out before prefill (engine.transfer.fetcher)
        self.kv_fetches = Counter(
            f"{p}_kv_fetches",
            "Fetch plans by outcome: ok, or the failure that made the request recompute",
            ["outcome"],
            registry=r,
        )
        self.kv_fetched_tokens = Counter(
            f"{p}_kv_fetched_tokens", "Prompt tokens whose KV was fetched from a peer", registry=r
        )
        self.kv_fetch_recomputed_tokens = Counter(
            f"{p}_kv_fetch_recomputed_tokens",
            "Prompt tokens a fetch plan covered that were recomputed because the fetch failed",
            registry=r,
        )
        self.kv_fetch_seconds = Histogram(
            f"{p}_kv_fetch_seconds",
            "Time a fetch plan held a request before its prefill",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            f"{p}_time_to_first_token_seconds",
            "Request arrival to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            f"{p}_inter_token_latency_seconds",
            "Time between output tokens",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            f"{p}_e2e_request_latency_seconds",
            "Request arrival to last token",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        gauges = {
            "num_running_requests": ("Requests being computed", "num_running"),
            "num_waiting_requests": ("Requests queued for admission", "num_waiting"),
            "kv_pages_used": ("KV pages in use (requests and prefix cache)", "pages_used"),
            "kv_pages_free": ("KV pages on the free list", "pages_free"),
            "kv_pages_cached": ("KV pages owned by the prefix cache", "pages_cached"),
            "kv_pages_total": ("KV pool capacity in pages", "pages_total"),
            "kv_pages_pinned": ("KV pages held by retention pins (kv_pin), never evicted", "pages_pinned"),
            "kv_pins": ("Retention pins held", "num_pins"),
            "kv_pins_refused": (
                "Retention pins refused for the overall pin budget, since start",
                "pins_refused",
            ),
            "kv_host_pages_cached": ("Host-tier pages holding cached prefixes", "host_pages_cached"),
            "kv_host_pages_total": ("Host-tier capacity in pages (0 without tiers)", "host_pages_total"),
            "kv_disk_pages_cached": ("Disk-tier pages holding cached prefixes", "disk_pages_cached"),
            "kv_disk_pages_total": (
                "Disk-tier capacity in pages (0 without a disk tier)",
                "disk_pages_total",
            ),
            "step_token_budget": (
                "Tokens a step carrying the running decodes may hold (--itl-slo-ms; else the static cap)",
                "step_token_budget",
            ),
            "step_time_fixed_seconds": (
                "Learned step time t = fixed + per_token * tokens: the fixed part (0 until fitted)",
                "step_time_fixed_s",
            ),
            "step_time_per_token_seconds": (
                "Learned step time t = fixed + per_token * tokens: each token's part (0 until fitted)",
                "step_time_per_token_s",
            ),
        }
        for name, (doc, stat) in gauges.items():
            Gauge(f"{p}_{name}", doc, registry=r).set_function(
                lambda stat=stat: getattr(engine.stats, stat)  # the snapshot current at scrape time
            )
        Gauge(f"{p}_info", "Served model", ["model"], registry=r).labels(model).set(1)
        r.register(_LoadedTokens(f"{p}_kv_loaded_tokens", engine))

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
        self.computed_prompt_tokens.inc(final.prompt_tokens - final.cached_tokens)
        self.generation_tokens.inc(final.completion_tokens)
        self.e2e_latency.observe(seconds)

    def record_fetch(self, outcome: FetchOutcome | None) -> None:
        """Count one fetch plan (None: this engine has no transfer service and ignored it)."""
        if outcome is None:
            self.kv_fetches.labels("not_enabled").inc()
            return
        self.kv_fetches.labels(outcome.failure or "ok").inc()
        self.kv_fetched_tokens.inc(outcome.fetched_tokens)
        self.kv_fetch_recomputed_tokens.inc(outcome.planned_tokens - outcome.fetched_tokens)
        self.kv_fetch_seconds.observe(outcome.seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
