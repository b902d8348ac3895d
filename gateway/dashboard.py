"""What the dashboard page needs beyond /stats' per-request figures, and the page itself.

* History: once a second the gateway appends a sample (cumulative totals and hit rates, throughput and
  latency over the last ``WINDOW_S`` seconds) to a ring buffer of ``HISTORY_S`` samples, so a freshly opened page has the last
  minutes at once. ``/stats?since=T`` returns the samples newer than ``T``.
* Cluster: replicas sharing state (``gateway.shared_state``) push their totals into its counters once a
  second, off the request path: the increase since the last push goes to ``dash|cluster|<name>`` (all
  replicas summed by the store) and ``dash|replica|<id>|<name>`` (one replica), plus a ``heartbeat`` per
  replica. Every replica reads the counters back on the same tick and derives the cluster figures from
  them, so any replica's page shows all of them. The cluster's TTFT/TPOT percentiles travel as per-bucket
  counts (``ttft_le_<i>``, see ``gateway.metrics.bucket_key``) and are estimated as Prometheus'
  ``histogram_quantile`` does (the page labels them as estimates); one replica's are exact, from its
  recorded requests. A replica whose heartbeat has not moved for ``STALE_AFTER_S`` seconds is
  shown as not live; its totals stay in the cluster sums (they are history).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.metrics import (
    HISTOGRAM_BOUNDS,
    GatewayMetrics,
    cached_by_tier,
    hit_rates,
    latency_percentiles,
    prompt_sources,
)
from gateway.shared_state import SharedState

log = logging.getLogger(__name__)

COUNTER_PREFIX = "dash|"
HISTORY_S = 600
WINDOW_S = 10
STALE_AFTER_S = 5.0
STATIC_DIR = Path(__file__).parent / "static"
_PAGE_FILES = {
    "dashboard.html": "text/html",
    "dashboard.css": "text/css",
    "dashboard.js": "text/javascript",
}
# The page fetches nothing but its own files and /stats: the browser enforces it.
_CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'"


# -- pure figures (unit-tested) ---------------------------------------------------------------------
def counter_deltas(replica_id: str, own: Mapping[str, int], pushed: Mapping[str, int]) -> dict[str, int]:
    """Counter increments that bring the store up to ``own`` from what was ``pushed`` before, in the
    order to send them: ``requests`` last, so a replica reading the counters between two of these
    increments never sees a request without its tokens (a push is several round trips, not atomic)."""
    out: dict[str, int] = {}
    for name, value in sorted(own.items(), key=lambda item: item[0] == "requests"):
        delta = value - pushed.get(name, 0)
        if delta:
            out[f"{COUNTER_PREFIX}cluster|{name}"] = delta
            out[f"{COUNTER_PREFIX}replica|{replica_id}|{name}"] = delta
    out[f"{COUNTER_PREFIX}replica|{replica_id}|heartbeat"] = 1
    return out


def split_counters(counters: Mapping[str, int]) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """``(cluster totals, {replica id: its totals})`` from the store's counters (others ignored)."""
    cluster: dict[str, int] = {}
    replicas: dict[str, dict[str, int]] = {}
    for key, value in counters.items():
        if not key.startswith(COUNTER_PREFIX):
            continue
        scope, _, rest = key[len(COUNTER_PREFIX) :].partition("|")
        if scope == "cluster":
            cluster[rest] = value
        elif scope == "replica":
            replica, _, name = rest.partition("|")
            replicas.setdefault(replica, {})[name] = value
    return cluster, replicas


def own_totals(metrics: GatewayMetrics) -> dict[str, int]:
    """This replica's cumulative totals as flat counters (routing decisions as ``routing|policy/reason``)."""
    own = {k: v for k, v in metrics.totals.items() if v}
    own.update({f"routing|{reason}": n for reason, n in metrics.reasons.items()})
    return own


def bucket_quantile(counts: Mapping[str, int], histogram: str, q: float) -> float | None:
    """Quantile ``q`` of the per-bucket counts ``<histogram>_le_<i>`` by linear interpolation inside the
    bucket (as ``histogram_quantile``); the +Inf bucket answers the highest finite bound."""
    bounds = HISTOGRAM_BOUNDS[histogram]
    per_bucket = [max(0, counts.get(f"{histogram}_le_{i}", 0)) for i in range(len(bounds) + 1)]
    total = sum(per_bucket)
    if total == 0:
        return None
    rank, seen = q * total, 0
    for i, n in enumerate(per_bucket):
        if n and seen + n >= rank:
            if i == len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / n
        seen += n
    return bounds[-1]


def figures(totals: Mapping[str, int]) -> dict[str, Any]:
    """The dashboard's headline figures from cumulative (or windowed) flat totals."""
    return {
        "requests": totals.get("requests", 0),
        "errors": totals.get("errors", 0),
        "prompt_tokens": totals.get("prompt_tokens", 0),
        "completion_tokens": totals.get("completion_tokens", 0),
        "cached_tokens": totals.get("cached_tokens", 0),
        "predicted_cached_tokens": totals.get("predicted_cached_tokens", 0),
        "predicted_cached_tokens_by_tier": cached_by_tier(totals),
        "prompt_tokens_saved": totals.get("cached_tokens", 0),
        "prompt_tokens_by_source": prompt_sources(totals),  # cached here, fetched from a peer, computed
        "kv_fetched_tokens": totals.get("kv_fetched_tokens", 0),
        "kv_fetch_recomputed_tokens": totals.get("kv_fetch_recomputed_tokens", 0),
        **hit_rates(totals),
        **{
            f"{h}_p{round(q * 100)}_s": bucket_quantile(totals, h, q)
            for h in HISTOGRAM_BOUNDS
            for q in (0.5, 0.9, 0.99)
        },
        "routing": {k[len("routing|") :]: v for k, v in totals.items() if k.startswith("routing|") and v},
    }


def window(before: Mapping[str, int], now: Mapping[str, int], seconds: float) -> dict[str, Any]:
    """Throughput over the interval between two cumulative readings, and the hit rates of every request up
    to ``now`` (None before any): over the same requests as the hit-rate cards (``figures(now)``), so the
    chart's latest point is the card's figure. A windowed hit rate would disagree with its card whenever
    requests finished outside the window, or before this replica first read the shared counters."""
    delta = {k: v - before.get(k, 0) for k, v in now.items()}
    f = figures(delta)
    total = hit_rates(now)
    return {
        "requests": now.get("requests", 0),
        "prompt_tokens_saved": now.get("cached_tokens", 0),
        "requests_per_s": f["requests"] / seconds,
        "prompt_tokens_per_s": f["prompt_tokens"] / seconds,
        "saved_tokens_per_s": f["cached_tokens"] / seconds,
        "hit_rate_actual": total["hit_rate_actual"] if now.get("reported_prompt_tokens", 0) else None,
        "hit_rate_predicted": total["hit_rate_predicted"] if now.get("prompt_tokens", 0) else None,
        **{k: f[k] for k in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")},
    }


# -- the running part -----------------------------------------------------------------------------
class Dashboard:
    """History ring buffer and cluster view of one gateway replica; ``tick`` runs once a second."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        shared_state: SharedState,
        replica_id: str,
        shared: bool,
        in_flight: Callable[[], int],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.metrics, self.shared_state, self.replica_id = metrics, shared_state, replica_id
        self.shared = shared  # other replicas share ``shared_state``: push and read the cluster counters
        self.in_flight, self.clock = in_flight, clock
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_S)
        self._readings: deque[tuple[float, dict[str, int], dict[str, int] | None]] = deque(
            maxlen=WINDOW_S + 1
        )
        self._pushed: dict[str, int] = {}
        self._heartbeats: dict[str, tuple[int, float]] = {}  # replica -> (last value, when it changed)
        self.cluster: dict[str, Any] | None = None

    def seconds_to_next_sample(self) -> float:
        return 1.0 - self.clock() % 1.0

    async def tick(self) -> None:
        cluster_totals = None
        if self.shared:
            await self.push()
            cluster_totals = self._read_cluster(await self.shared_state.counters())
        now = self.clock()
        own = own_totals(self.metrics)
        self._readings.append((now, own, cluster_totals))
        t0, own0, cluster0 = self._readings[0]
        seconds = max(now - t0, 1.0)
        sample = {"t": round(now, 3), "in_flight": self.in_flight(), **window(own0, own, seconds)}
        # This replica's percentiles are exact, over the requests that finished in the window (at most the
        # last ``recent_requests`` of them); bucket estimates are for the cluster, which has only counts.
        finished = own.get("requests", 0) - own0.get("requests", 0)
        window_records = list(self.metrics.recent)[-finished:] if finished > 0 else []
        exact = latency_percentiles(window_records)
        sample.update({k: exact[k] for k in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")})
        if cluster_totals is not None:
            sample["cluster"] = window(cluster0 or {}, cluster_totals, seconds)
        self.history.append(sample)

    async def push(self) -> None:
        """Send this replica's increase since the last push (the shared state keeps what Redis misses)."""
        own = own_totals(self.metrics)
        for counter, amount in counter_deltas(self.replica_id, own, self._pushed).items():
            await self.shared_state.incr(counter, amount)
        self._pushed = own

    def since(self, t: float) -> list[dict[str, Any]]:
        return [s for s in self.history if s["t"] > t]

    def _read_cluster(self, counters: Mapping[str, int]) -> dict[str, int]:
        now = self.clock()
        cluster, replicas = split_counters(counters)
        rows = []
        for replica, totals in sorted(replicas.items()):
            beat, previous = totals.get("heartbeat", 0), self._heartbeats.get(replica)
            if previous is None or beat != previous[0]:
                # First sight proves nothing (it may have died long ago): live once its heartbeat moves.
                self._heartbeats[replica] = (beat, now if previous is not None else float("-inf"))
            live = replica == self.replica_id or now - self._heartbeats[replica][1] < STALE_AFTER_S
            f = figures(totals)
            rows.append(
                {
                    "id": replica,
                    "self": replica == self.replica_id,
                    "live": live,
                    **{k: f[k] for k in ("requests", "errors", "prompt_tokens_saved")},
                    **{k: f[k] for k in ("hit_rate_actual", "hit_rate_predicted", "ttft_p50_s")},
                }
            )
        self.cluster = {
            "totals": figures(cluster),
            "replicas": rows,
            "live_replicas": sum(r["live"] for r in rows),
            "updated": now,
        }
        return cluster


def drop_dashboard_counters(counters: Mapping[str, int]) -> dict[str, int]:
    return {k: v for k, v in counters.items() if not k.startswith(COUNTER_PREFIX)}


# -- the page -------------------------------------------------------------------------------------
async def page(request: web.Request) -> web.FileResponse:
    name = request.match_info.get("name", "dashboard.html")
    if name not in _PAGE_FILES:
        raise web.HTTPNotFound()
    return web.FileResponse(
        STATIC_DIR / name,
        headers={
            "Content-Type": _PAGE_FILES[name],
            "Content-Security-Policy": _CSP,
            "Cache-Control": "no-cache",
        },
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/dashboard", page)
    app.router.add_get("/dashboard/{name}", page)
