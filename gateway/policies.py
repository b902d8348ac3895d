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

from cache.index.radix_index import MatchResult
from gateway.config import RoutingConfig
from gateway.workers import Worker


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


class Policy(ABC):
    """Chooses among ``workers`` (non-empty, all available). Must not mutate workers or the request."""

    name: str

    def __init__(self, config: RoutingConfig) -> None:
        self.config = config

    @abstractmethod
    def choose(self, request: RouteRequest, workers: list[Worker]) -> Decision: ...

    def predicted_cached(self, request: RouteRequest, worker: Worker) -> int:
        """Prompt tokens the worker should find cached (device and host tiers), never the whole prompt."""
        match = request.matches.get(worker.worker_id)
        if match is None:
            return 0
        return min(match.blocks * worker.page_size, max(request.prompt_tokens - 1, 0))

    def effective_cached(self, request: RouteRequest, worker: Worker) -> float:
        """Cached tokens weighted by tier: a host-tier hit saves less than a device-tier one."""
        match = request.matches.get(worker.worker_id)
        if match is None:
            return 0.0
        device = match.device_blocks * worker.page_size
        host = match.host_blocks * worker.page_size * self.config.host_tier_weight
        return min(device + host, max(request.prompt_tokens - 1, 0))


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, config: RoutingConfig) -> None:
        super().__init__(config)
        self._counter = itertools.count()

    def choose(self, request: RouteRequest, workers: list[Worker]) -> Decision:
        worker = workers[next(self._counter) % len(workers)]
        return Decision(worker, "round_robin", self.predicted_cached(request, worker))


class LeastLoad(Policy):
    name = "least_load"

    def choose(self, request: RouteRequest, workers: list[Worker]) -> Decision:
        worker = min(workers, key=lambda w: (w.load, w.routed))
        return Decision(worker, "least_load", self.predicted_cached(request, worker))


class PowerOfTwo(Policy):
    name = "power_of_two"

    def __init__(self, config: RoutingConfig, rng: random.Random | None = None) -> None:
        super().__init__(config)
        self.rng = rng or random.Random()

    def choose(self, request: RouteRequest, workers: list[Worker]) -> Decision:
        pair = self.rng.sample(workers, 2) if len(workers) > 1 else workers
        worker = min(pair, key=lambda w: w.load)
        return Decision(worker, "power_of_two", self.predicted_cached(request, worker))


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
            return Decision(worker, "session", self.predicted_cached(request, worker))
        worker = min(workers, key=lambda w: (w.load, w.routed))
        return Decision(worker, "least_load", self.predicted_cached(request, worker))


class CacheAware(Policy):
    """Fewest prompt tokens left to prefill, weighed against load, under a bounded-load guard.

    cost(w) = prompt tokens not cached on w (host-tier hits count ``host_tier_weight``)
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
            return Decision(worker, "session", self.predicted_cached(request, worker))

        def cost(w: Worker) -> tuple[float, int, int]:
            uncached = request.prompt_tokens - self.effective_cached(request, w)
            return (uncached + self.config.load_cost_tokens * w.load, w.load, w.routed)

        worker = min(eligible, key=cost)
        cached = self.predicted_cached(request, worker)
        if cached > 0:
            reason = "cache_hit"
        elif len(eligible) < len(workers):
            reason = "load_bound"
        else:
            reason = "least_load"
        return Decision(worker, reason, cached)


POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (RoundRobin, LeastLoad, PowerOfTwo, Session, CacheAware)
}


def make_policy(name: str, config: RoutingConfig) -> Policy:
    try:
        return POLICIES[name](config)
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}") from None
