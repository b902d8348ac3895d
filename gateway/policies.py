"""Routing policies: pick a worker for a request. Plain Python, no I/O.

Every policy sees the same ``RouteRequest`` — the prompt length, what the index says each worker
holds of its prefix, and the session's pinned worker — and the available workers, and returns a
``Decision`` that says why, so routing is observable (metrics, /stats, the dashboard).
"""

from __future__ import annotations

import itertools
import math
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cache.index.radix_index import MatchResult
from cache.planning.load_profile import KVLoadCost
from cache.wire.tiers import Tier
from gateway.config import RoutingConfig
from gateway.workers import Worker

if TYPE_CHECKING:
    from gateway.fetch_plans import PlannedFetch


@dataclass
class RouteRequest:
    prompt_tokens: int
    matches: dict[str, MatchResult] = field(default_factory=dict)  # worker id -> leading blocks held
    session_id: str | None = None
    pinned_worker: str | None = None  # the session's worker, if it has one


@dataclass(frozen=True)
class Decision:
    worker: Worker
    reason: str  # "cache_hit" | "least_load" | "session" | "round_robin" | ...
    predicted_cached_tokens: int = 0
    # of those, the tokens whose fastest copy on the worker is in its host / disk tier (the rest: device)
    predicted_host_tokens: int = 0
    predicted_disk_tokens: int = 0
    fetch: PlannedFetch | None = None  # a peer's prefix the worker pulls first (``gateway.fetch_plans``)


class Policy(ABC):
    """Chooses among ``workers`` (non-empty, all available). Must not mutate workers or the request."""

    name: str

    def __init__(self, config: RoutingConfig) -> None:
        self.config = config

    @abstractmethod
    def choose(self, request: RouteRequest, workers: list[Worker]) -> Decision: ...

    def predicted_cached(self, request: RouteRequest, worker: Worker) -> int:
        """Prompt tokens the worker should find cached (in any tier), never the whole prompt."""
        match = request.matches.get(worker.worker_id)
        if match is None:
            return 0
        return min(match.blocks * worker.page_size, max(request.prompt_tokens - 1, 0))

    def decide(self, request: RouteRequest, worker: Worker, reason: str) -> Decision:
        """``worker`` with its predicted cached tokens, split by the fastest tier holding them (device
        first: of a prompt's blocks the engine reuses device pages as they are and loads the rest)."""
        cached = self.predicted_cached(request, worker)
        match = request.matches.get(worker.worker_id)
        if match is None:
            return Decision(worker, reason, cached)
        left = cached - min(match.device_blocks * worker.page_size, cached)
        host = min(match.host_blocks * worker.page_size, left)
        return Decision(worker, reason, cached, host, min(match.disk_blocks * worker.page_size, left - host))

    def effective_cached(self, request: RouteRequest, worker: Worker) -> float:
        """Cached tokens weighted by tier: a host- or disk-tier hit counts ``tier_weight`` of a device
        hit. A lower-tier prefix shorter than the worker's ``min_load_tokens`` counts nothing: its engine
        recomputes it."""
        match = request.matches.get(worker.worker_id)
        if match is None:
            return 0.0
        ps = worker.page_size
        host, disk = match.host_blocks * ps, match.disk_blocks * ps
        cost = _kv_load(worker)
        if cost is not None and host + disk < cost.min_load_tokens:
            host = disk = 0
        from_host = host * self.tier_weight(worker, Tier.HOST) if host else 0.0
        from_disk = disk * self.tier_weight(worker, Tier.DISK) if disk else 0.0
        return min(match.device_blocks * ps + from_host + from_disk, max(request.prompt_tokens - 1, 0))

    def tier_weight(self, worker: Worker, tier: Tier) -> float:
        """What a hit in ``tier`` on ``worker`` saves, as a fraction of a device hit: ``1 - load_s /
        recompute_s`` as the worker measured them (``GET /load_profile``, ``KVLoadCost``), else
        ``host_tier_weight`` (before it has measured, or for a worker that does not say)."""
        cost = _kv_load(worker)
        saved = cost.saved_fraction(tier) if cost is not None else None
        return self.config.host_tier_weight if saved is None else saved


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, config: RoutingConfig) -> None:
        super().__init__(config)
        self._counter = itertools.count()

    def choose(self, request: RouteRequest, workers: list[Worker]) -> Decision:
        worker = workers[next(self._counter) % len(workers)]
        return self.decide(request, worker, "round_robin")


class LeastLoad(Policy):
    name = "least_load"

    def choose(self, request: RouteRequest, workers: list[Worker]) -> Decision:
        worker = min(workers, key=lambda w: (w.load, w.routed))
        return self.decide(request, worker, "least_load")


class PowerOfTwo(Policy):
    name = "power_of_two"

    def __init__(self, config: RoutingConfig, rng: random.Random | None = None) -> None:
        super().__init__(config)
        self.rng = rng or random.Random()

    def choose(self, request: RouteRequest, workers: list[Worker]) -> Decision:
        pair = self.rng.sample(workers, 2) if len(workers) > 1 else workers
        worker = min(pair, key=lambda w: w.load)
        return self.decide(request, worker, "power_of_two")


def _within_bound(worker: Worker, workers: list[Worker], factor: float, slack: int) -> bool:
    """Bounded-load guard (consistent hashing with bounded loads): taking one more request must not
    push a worker past ``factor`` x the mean load after this request, unless it stays within
    ``slack`` requests of the least loaded worker."""
    total = sum(w.load for w in workers) + 1
    cap = max(math.ceil(factor * total / len(workers)), min(w.load for w in workers) + slack)
    return worker.load + 1 <= cap


class Session(Policy):
    """Sticky sessions: a session stays on its worker; a new session goes to the least loaded one."""

    name = "session"

    def choose(self, request: RouteRequest, workers: list[Worker]) -> Decision:
        by_id = {w.worker_id: w for w in workers}
        if request.pinned_worker in by_id:
            worker = by_id[request.pinned_worker]
            return self.decide(request, worker, "session")
        worker = min(workers, key=lambda w: (w.load, w.routed))
        return self.decide(request, worker, "least_load")


class CacheAware(Policy):
    """Fewest prompt tokens left to prefill, weighed against load, under a bounded-load guard.

    cost(w) = prompt tokens not cached on w (a host- or disk-tier hit counts ``tier_weight``)
              + ``load_cost_tokens`` x load(w)
    among workers under the bounded-load cap (see ``_within_bound``).
    A pinned session keeps its worker unless that would break the load bound.
    """

    name = "cache_aware"

    def choose(self, request: RouteRequest, workers: list[Worker]) -> Decision:
        factor, slack = self.config.bounded_load_factor, self.config.bounded_load_slack
        eligible = [w for w in workers if _within_bound(w, workers, factor, slack)] or workers
        by_id = {w.worker_id: w for w in eligible}
        if request.pinned_worker in by_id:
            worker = by_id[request.pinned_worker]
            return self.decide(request, worker, "session")

        def cost(w: Worker) -> tuple[float, int, int]:
            uncached = request.prompt_tokens - self.effective_cached(request, w)
            return (uncached + self.config.load_cost_tokens * w.load, w.load, w.routed)

        worker = min(eligible, key=cost)
        if self.predicted_cached(request, worker) > 0:
            reason = "cache_hit"
        elif len(eligible) < len(workers):
            reason = "load_bound"
        else:
            reason = "least_load"
        return self.decide(request, worker, reason)


POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (RoundRobin, LeastLoad, PowerOfTwo, Session, CacheAware)
}


def _kv_load(worker: Worker) -> KVLoadCost | None:
    return worker.load_profile.kv_load if worker.load_profile is not None else None


def make_policy(name: str, config: RoutingConfig) -> Policy:
    try:
        return POLICIES[name](config)
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}") from None
