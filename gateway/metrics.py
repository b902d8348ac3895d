"""Prometheus metrics and the in-memory figures behind /stats. One registry per app (no globals).

Names are documented in docs/metrics.md; hit rate = cached / prompt tokens, predicted (from the
index, at routing time) and actual (from the worker's ``usage.prompt_tokens_details.cached_tokens``).
Tokens a worker fetched from a peer (a fetch plan, docs/kv-transfer.md) are in its cached tokens but
were never predicted on it: they are counted as their own kind (``kv_fetched_tokens``), so that
``actual - fetched`` against ``predicted`` measures the index alone.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter as Tally
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cache.api.replies import KVFetch
from cache.index.radix_index import IndexStats

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
# Per output token: time per output token (per request) and inter-token latency (per stream chunk).
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)
_FETCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# The bucket bounds /stats and the cluster counters use for TTFT, TPOT and KV fetch time (as the histograms).
HISTOGRAM_BOUNDS = {"ttft": _LATENCY_BUCKETS, "tpot": TOKEN_BUCKETS, "kv_fetch": _FETCH_BUCKETS}
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away before the answer ended


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
    tpot_s: float | None = None  # (latency - ttft) / (completion_tokens - 1), streamed requests only
    fetch_source: str | None = None  # the peer a kv_fetch_plan named (``gateway.fetch_plans``)
    fetch_planned_tokens: int = 0  # prompt tokens the plan should bring (counted in cached_tokens if it did)
    kv_fetch: KVFetch | None = None  # what the worker reported of the fetch it ran (usage)
    prefill_worker: str | None = None  # disaggregation: the worker that prefilled the prompt
    pd_path: str | None = None  # disaggregation: "remote", "local" or "fallback" (gateway.disaggregation)
    # of predicted_cached_tokens, those whose fastest copy on the worker is in its host / disk tier
    predicted_host_tokens: int = 0
    predicted_disk_tokens: int = 0

    def fetched_tokens(self) -> int:
        """Prompt tokens the worker fetched from a peer, as it reported them; a worker that ran a plan
        without saying is credited with what its cached tokens exceed the prediction by, up to the plan."""
        if self.cached_tokens is None:
            return 0
        if self.kv_fetch is not None:
            return min(self.kv_fetch.tokens, self.cached_tokens)
        surplus = self.cached_tokens - self.predicted_cached_tokens
        return max(0, min(self.fetch_planned_tokens, surplus))

    @property
    def kv_fetch_s(self) -> float | None:
        return self.kv_fetch.seconds if self.kv_fetch is not None else None

    def predicted_by_tier(self) -> dict[str, int]:
        host, disk = self.predicted_host_tokens, self.predicted_disk_tokens
        return {"device": self.predicted_cached_tokens - host - disk, "host": host, "disk": disk}

    @staticmethod
    def time_per_output_token(ttft_s: float | None, latency_s: float, completion_tokens: int) -> float | None:
        if ttft_s is None or completion_tokens < 2:
            return None
        return max(0.0, latency_s - ttft_s) / (completion_tokens - 1)


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
        self.routed_cached = Counter(
            "prefixgate_routed_cached_tokens",
            "Prompt tokens the index predicted cached on the chosen worker, by the fastest tier holding them "
            "there (device, host, disk); they sum to prefixgate_cached_tokens_predicted",
            ["tier"],
            registry=r,
        )
        self.prompt_tokens_reported = Counter(
            "prefixgate_prompt_tokens_reported",
            "Prompt tokens of requests whose worker reported cached_tokens (the actual hit rate's denominator)",
            registry=r,
        )
        self.completion_tokens = Counter(
            "prefixgate_completion_tokens", "Completion tokens workers reported (usage)", registry=r
        )
        self.retries = Counter("prefixgate_retries", "Requests retried on another worker", registry=r)
        self.ttft = Histogram(
            "prefixgate_ttft_seconds", "Time to first byte of output", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "prefixgate_request_seconds", "End-to-end request latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "prefixgate_tpot_seconds",
            "Time per output token after the first, per streamed request",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "prefixgate_itl_seconds",
            "Inter-token latency: time between two streamed chunks with text",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.worker_load = Gauge(
            "prefixgate_worker_load", "In-flight requests per worker", ["worker"], registry=r
        )
        self.worker_healthy = Gauge(
            "prefixgate_worker_healthy", "1 if the worker is available", ["worker"], registry=r
        )
        self.pd_advice_workers = Gauge(
            "prefixgate_gateway_pd_advice_workers",
            "P:D advice: workers of each role the observed load needs under the TTFT and ITL SLOs "
            "(prefill + decode, or mixed instead); NaN when no count meets them",
            ["role"],
            registry=r,
        )
        self.pd_deployed_workers = Gauge(
            "prefixgate_gateway_pd_deployed_workers", "Available workers of each role", ["role"], registry=r
        )
        self.index_blocks = Gauge(
            "prefixgate_index_blocks",
            "Blocks per worker and tier in the index",
            ["worker", "tier"],
            registry=r,
        )
        self.index_size = Gauge(
            "prefixgate_index_size",
            "Index entries: distinct blocks (bounded by max_blocks) and approximate (expiring) holder entries",
            ["kind"],
            registry=r,
        )
        self.index_evictions = Counter(
            "prefixgate_index_evictions", "Blocks evicted from the index by its LRU bound", registry=r
        )
        self._index_evictions_seen = 0  # the index's own count when last observed
        self.store_degraded = Gauge(
            "prefixgate_store_degraded", "1 while the shared store is unreachable", registry=r
        )
        self.store_errors = Counter(
            "prefixgate_store_errors",
            "Shared-store content that failed validation (bad log entries, corrupt snapshots, bad values)",
            ["kind"],
            registry=r,
        )
        self._store_errors_seen: dict[str, int] = {}
        self.kv_event_errors = Counter(
            "prefixgate_kv_event_errors",
            "KV event messages skipped as malformed, and consumer restarts, per worker",
            ["worker", "reason"],
            registry=r,
        )
        self.kv_fetch_plans = Counter(
            "prefixgate_kv_fetch_plans",
            "Requests whose chosen worker lacked a prefix a peer held, by what the gateway did: attached a "
            "kv_fetch_plan, or why not",
            ["outcome"],
            registry=r,
        )
        self.kv_fetch_planned_tokens = Counter(
            "prefixgate_kv_fetch_planned_tokens",
            "Prompt tokens attached fetch plans asked workers to pull from a peer",
            registry=r,
        )
        self.kv_fetched_tokens = Counter(
            "prefixgate_kv_fetched_tokens",
            "Prompt tokens workers reported fetched from a peer (counted in prefixgate_cached_tokens_actual)",
            registry=r,
        )
        self.kv_fetch_recomputed_tokens = Counter(
            "prefixgate_kv_fetch_recomputed_tokens",
            "Prompt tokens attached fetch plans named that the worker recomputed (the fetch fell short)",
            registry=r,
        )
        self.kv_fetch_seconds = Histogram(
            "prefixgate_kv_fetch_seconds",
            "Time a worker spent fetching a plan's KV from a peer before its prefill, as it reported it",
            buckets=_FETCH_BUCKETS,
            registry=r,
        )
        self.pd_requests = Counter(
            "prefixgate_pd_requests",
            "Requests to a disaggregated pool by path: prefilled on a prefill worker (remote), by the decode "
            "worker as too little was uncached (local), or by it because the prefill leg failed (fallback)",
            ["path"],
            registry=r,
        )
        self.pd_paths: Tally[str] = Tally()
        self.fetch_outcomes: Tally[str] = Tally()
        self.fetch_planned_tokens = 0
        self.recent: deque[RequestRecord] = deque(maxlen=recent)
        self.totals: Tally[str] = Tally()
        self.reasons: Tally[str] = Tally()
        self.started = time.time()

    def observe_index(self, stats: IndexStats) -> None:
        self.index_size.labels("blocks").set(stats.blocks)
        self.index_size.labels("approximate").set(stats.approx_entries)
        # The index counts evictions itself; a replica that loads a snapshot gets a new index whose count
        # restarts at 0, so a drop means everything it counted since is new.
        seen = self._index_evictions_seen if stats.evictions >= self._index_evictions_seen else 0
        self.index_evictions.inc(stats.evictions - seen)
        self._index_evictions_seen = stats.evictions

    def observe_store_errors(self, counts: Mapping[str, int]) -> None:
        """``counts``: the store's own cumulative error counts by kind (a new store restarts at 0)."""
        for kind, count in counts.items():
            seen = self._store_errors_seen.get(kind, 0)
            self.store_errors.labels(kind).inc(count - seen if count >= seen else count)
            self._store_errors_seen[kind] = count

    def record(self, rec: RequestRecord, inter_token_s: Sequence[float] = ()) -> None:
        self.recent.append(rec)
        self.requests.labels(rec.worker, str(rec.status)).inc()
        self.latency.observe(rec.latency_s)
        t = self.totals
        if rec.ttft_s is not None:
            self.ttft.observe(rec.ttft_s)
            t[bucket_key("ttft", rec.ttft_s)] += 1
        if rec.tpot_s is not None:
            self.tpot.observe(rec.tpot_s)
            t[bucket_key("tpot", rec.tpot_s)] += 1
        for gap in inter_token_s:
            self.itl.observe(gap)
        t["requests"] += 1
        t["cancelled"] += rec.status == CLIENT_CLOSED
        t["errors"] += rec.status >= 400 and rec.status != CLIENT_CLOSED
        if rec.status < 400:
            t["prompt_tokens"] += rec.prompt_tokens
            t["predicted_cached_tokens"] += rec.predicted_cached_tokens
            self.prompt_tokens.inc(rec.prompt_tokens)
            self.cached_predicted.inc(rec.predicted_cached_tokens)
            for tier, tokens in rec.predicted_by_tier().items():
                t[f"predicted_cached_tokens_{tier}"] += tokens
                self.routed_cached.labels(tier).inc(tokens)
            if rec.cached_tokens is not None:
                t["reported_prompt_tokens"] += rec.prompt_tokens
                t["cached_tokens"] += rec.cached_tokens
                self.cached_actual.inc(rec.cached_tokens)
                self.prompt_tokens_reported.inc(rec.prompt_tokens)
                self._record_fetch(rec)
            t["completion_tokens"] += rec.completion_tokens
            self.completion_tokens.inc(rec.completion_tokens)

    def _record_fetch(self, rec: RequestRecord) -> None:
        """The fetched tokens of a request whose worker reported usage, and what its plan left to recompute."""
        t, fetched = self.totals, rec.fetched_tokens()
        t["kv_fetched_tokens"] += fetched
        self.kv_fetched_tokens.inc(fetched)
        recomputed = max(0, rec.fetch_planned_tokens - fetched)
        t["kv_fetch_recomputed_tokens"] += recomputed
        self.kv_fetch_recomputed_tokens.inc(recomputed)
        if (seconds := rec.kv_fetch_s) is not None:
            self.kv_fetch_seconds.observe(seconds)
            t[bucket_key("kv_fetch", seconds)] += 1

    def fetch_plan(self, outcome: str, planned_tokens: int) -> None:
        """One routing decision where a peer held more of the prompt (``gateway.fetch_plans.OUTCOMES``)."""
        self.kv_fetch_plans.labels(outcome).inc()
        self.kv_fetch_planned_tokens.inc(planned_tokens)
        self.fetch_outcomes[outcome] += 1
        self.fetch_planned_tokens += planned_tokens

    def pd_request(self, path: str) -> None:
        self.pd_requests.labels(path).inc()
        self.pd_paths[path] += 1

    def decision(self, policy: str, reason: str, worker: str) -> None:
        self.decisions.labels(policy, reason, worker).inc()
        self.reasons[f"{policy}/{reason}"] += 1

    def summary(self) -> dict:
        t = self.totals
        prompt = t["prompt_tokens"]
        return {
            "requests": t["requests"],
            "errors": t["errors"],
            "cancelled": t["cancelled"],  # status 499: the client went away
            "prompt_tokens": prompt,
            "completion_tokens": t["completion_tokens"],
            "cached_tokens": t["cached_tokens"],
            "predicted_cached_tokens": t["predicted_cached_tokens"],
            "predicted_cached_tokens_by_tier": cached_by_tier(t),
            "prompt_tokens_by_source": prompt_sources(t),
            **hit_rates(t),
            "prompt_tokens_saved": t["cached_tokens"],
            **latency_percentiles(self.recent),
            "latency_window": len(self.recent),  # the percentiles are over the last this-many requests
            "routing": dict(self.reasons),
            "pd_paths": dict(self.pd_paths),  # disaggregation: path -> requests (gateway.disaggregation)
            "kv_fetch_plans": dict(self.fetch_outcomes),  # outcome -> decisions (gateway.fetch_plans)
            "kv_fetch_planned_tokens": self.fetch_planned_tokens,
            "kv_fetched_tokens": t["kv_fetched_tokens"],
            "kv_fetch_recomputed_tokens": t["kv_fetch_recomputed_tokens"],
            "uptime_s": time.time() - self.started,
        }

    def recent_requests(self, limit: int = 50) -> list[dict]:
        return [{**asdict(r), "fetched_tokens": r.fetched_tokens()} for r in list(self.recent)[-limit:]]


def hit_rates(totals: Mapping[str, int]) -> dict[str, float]:
    """Actual = cached / prompt tokens of the requests whose worker reported usage (so workers that report
    nothing do not dilute it); predicted = what the index promised / all prompt tokens routed."""
    reported, prompt = totals.get("reported_prompt_tokens", 0), totals.get("prompt_tokens", 0)
    return {
        "hit_rate_actual": totals.get("cached_tokens", 0) / reported if reported else 0.0,
        "hit_rate_predicted": totals.get("predicted_cached_tokens", 0) / prompt if prompt else 0.0,
        # of the actual hit rate, the share fetched from peers (never predicted on the chosen worker)
        "hit_rate_fetched": totals.get("kv_fetched_tokens", 0) / reported if reported else 0.0,
    }


def prompt_sources(totals: Mapping[str, int]) -> dict[str, int]:
    """Where the prompt tokens of requests whose worker reported usage came from: its own cache
    (``cached``), a peer's (``fetched``: a fetch plan), or its forward passes (``computed``)."""
    cached, fetched = totals.get("cached_tokens", 0), totals.get("kv_fetched_tokens", 0)
    return {
        "cached": cached - fetched,
        "fetched": fetched,
        "computed": max(0, totals.get("reported_prompt_tokens", 0) - cached),
    }


TIERS = ("device", "host", "disk")


def cached_by_tier(totals: Mapping[str, int]) -> dict[str, int]:
    """Predicted cached tokens of routed requests by the fastest tier holding them on their worker."""
    return {tier: totals.get(f"predicted_cached_tokens_{tier}", 0) for tier in TIERS}


def bucket_key(histogram: str, value: float) -> str:
    """The totals key counting ``value`` in its bucket: ``ttft_le_3`` = bucket ``(bounds[2], bounds[3]]``;
    index ``len(bounds)`` is the +Inf bucket. Counts are per bucket, not cumulative."""
    return f"{histogram}_le_{bisect_left(HISTOGRAM_BOUNDS[histogram], value)}"


def latency_percentiles(records: Iterable[RequestRecord]) -> dict[str, float | int | None]:
    """Exact TTFT, TPOT and KV fetch time percentiles of ``records`` (nearest rank over the recorded
    values), and how many values each is over: only streamed requests have a TTFT (a whole answer arrives
    at once), only those with two or more output tokens a TPOT, and only those whose worker ran a fetch
    plan and reported it a fetch time."""
    out: dict[str, float | int | None] = {}
    for name in HISTOGRAM_BOUNDS:  # ttft, tpot, kv_fetch (requests that ran a fetch plan)
        values = sorted(v for r in records if (v := getattr(r, f"{name}_s")) is not None)
        out.update({f"{name}_p{round(q * 100)}_s": _pct(values, q) for q in (0.5, 0.9, 0.99)})
        out[f"{name}_samples"] = len(values)
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]
