"""Fetch plans: the chosen worker pulls a cached prefix from the peer that holds it instead of recomputing it.

When the policy sends a request to worker B although worker A holds a longer prefix of its prompt (load
balancing, a session pin, A excluded from the candidates), the gateway attaches ``kv_fetch_plan``
(``cache.api.kv_fields.FetchPlan``, docs/kv-transfer.md) naming A as the source of the blocks B lacks, when:

* both run KV transfer (``--kv-transfer``: the worker probe read ``GET /kv_transfer/info``) with equal KV
  layouts (model, dtype, shape, page size), since pages are exchanged byte for byte;
* A is healthy and has not failed this request already (a dead source costs B a timeout before it
  falls back);
* the blocks B would receive come to at least ``kv_fetch_min_tokens`` tokens (a floor: below it a plan
  is not worth its round trips whatever the measurements say);
* moving them is estimated cheaper than recomputing them on B (``fetch_pays``): their bytes (from the
  KV layout) over B's measured fetch throughput plus its measured per-fetch round trip, against the
  tokens over B's measured prefill rate (``GET /kv_transfer/info``'s ``fetch_cost``, ``GET
  /load_profile``). Until B has measured both, the token floor decides alone.

Tenants never cross: the plan's hashes are the prompt's chain in the tenant's namespace (its salt), the
only chain the index was asked about, so only a holder of *this tenant's* blocks can be a source; the
plan's ``namespace`` is that salt, which the engine requires to equal the request's ``cache_salt`` and
under whose root alone the source looks the chain up.

A plan is advice: B falls back to recomputing on any failure (source evicted the blocks, timeout,
expired plan), so a stale index entry costs a round trip, never a request. ``plan_fetch`` is the pure
decision; ``FetchPlanner.attach`` is the router's hook around it.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cache.api.kv_fields import MAX_FETCH_ENDPOINT_CHARS, MAX_FETCH_PLAN_BLOCKS, FetchPlan
from cache.index.radix_index import MatchResult
from gateway.config import RoutingConfig
from gateway.metrics import GatewayMetrics
from gateway.workers import Worker, WorkerPool

if TYPE_CHECKING:
    from gateway.policies import Decision
    from gateway.router import PreparedRequest

# Why a peer held more of the prompt than the chosen worker, and what came of it (the metric's label).
OUTCOMES = (
    "attached",  # a plan goes with the request
    "below_min",  # the blocks to move come to fewer than kv_fetch_min_tokens
    "not_cheaper",  # by the target's measurements, recomputing them is at least as fast as moving them
    "not_enabled",  # the chosen worker or every longer holder runs without --kv-transfer
    "layout_mismatch",  # no longer holder has the chosen worker's KV layout
    "source_unhealthy",  # every compatible longer holder is down or already failed this request
)


@dataclass(frozen=True)
class PlannedFetch:
    """A plan attached to a request, and what the gateway expects of it."""

    plan: FetchPlan
    source: str  # the source worker's id
    tokens: int  # prompt tokens the chosen worker should receive (the plan's blocks it does not hold)

    def to_json(self) -> dict[str, Any]:
        """The ``kv_fetch_plan`` body field, exactly as docs/kv-transfer.md names it."""
        return {**dataclasses.asdict(self.plan), "block_hashes": list(self.plan.block_hashes)}


def plan_fetch(
    target: Worker,
    workers: Iterable[Worker],
    matches: Mapping[str, MatchResult],
    hashes: Sequence[int],
    *,
    prompt_tokens: int,
    namespace: str,
    exclude: Iterable[str],
    min_tokens: int,
    plan_id: str,
    expires_at_ms: int,
) -> tuple[str | None, PlannedFetch | None]:
    """Whether ``target`` (the policy's choice) should fetch the prompt's prefix from a peer.

    ``hashes``: the prompt's chained block hashes in ``target``'s namespace (model id, tenant salt);
    ``matches``: the index's answer for them, worker id -> leading blocks held. Returns the outcome
    (one of ``OUTCOMES``; None when no peer holds more of the prompt than ``target``: nothing to decide)
    and the plan when the outcome is ``attached``. Pure: no I/O, nothing mutated.
    """
    ps = target.page_size
    # Never the page with the prompt's last token (the engine always computes one token), and never
    # more blocks than a plan may name (the engine would refuse the whole request as malformed).
    limit = min(len(hashes), max(prompt_tokens - 1, 0) // ps, MAX_FETCH_PLAN_BLOCKS)
    held = min(_blocks(matches, target), limit)
    holders = [
        w for w in workers if w.worker_id != target.worker_id and min(_blocks(matches, w), limit) > held
    ]
    if not holders:
        return None, None
    if target.kv_layout is None or not (enabled := [w for w in holders if w.kv_layout is not None]):
        return "not_enabled", None
    compatible = [w for w in enabled if w.kv_layout == target.kv_layout and w.page_size == ps]
    if not compatible:
        return "layout_mismatch", None
    excluded = set(exclude)
    usable = [
        w
        for w in compatible
        if w.healthy and w.worker_id not in excluded and len(w.url) <= MAX_FETCH_ENDPOINT_CHARS
    ]
    if not usable:
        return "source_unhealthy", None
    source = max(usable, key=lambda w: (min(_blocks(matches, w), limit), -w.load))
    blocks = min(_blocks(matches, source), limit)
    tokens = (blocks - held) * ps
    if tokens < min_tokens:
        return "below_min", None
    if not fetch_pays(target, tokens):
        return "not_cheaper", None
    plan = FetchPlan(plan_id, source.url, tuple(hashes[:blocks]), blocks, expires_at_ms, namespace)
    return "attached", PlannedFetch(plan, source.worker_id, tokens)


def fetch_pays(target: Worker, tokens: int) -> bool:
    """Whether ``target`` would get ``tokens`` prompt tokens' KV from a peer sooner than it computes it:
    ``round_trip + bytes / bandwidth < tokens / prefill rate``, on its own measurements (the link as its
    fetches saw it, its prefill rate over its forward passes). True while any is unmeasured: the caller's
    token floor then decides alone."""
    cost, profile, per_token = target.kv_fetch_cost, target.load_profile, target.kv_bytes_per_token
    rate = profile.prefill_tokens_per_s if profile is not None else None
    fetch_s = cost.seconds(tokens * per_token) if cost is not None and per_token is not None else None
    if fetch_s is None or rate is None:
        return True
    return fetch_s < tokens / rate


def _blocks(matches: Mapping[str, MatchResult], worker: Worker) -> int:
    match = matches.get(worker.worker_id)
    return match.blocks if match is not None else 0


class FetchPlanner:
    """The router's hook: after the policy has chosen, attach a plan when ``plan_fetch`` says it pays,
    and count every decision (``prefixgate_kv_fetch_plans_total{outcome}``)."""

    def __init__(self, routing: RoutingConfig, pool: WorkerPool, metrics: GatewayMetrics) -> None:
        self.routing, self.pool, self.metrics = routing, pool, metrics

    def attach(
        self, decision: Decision, req: PreparedRequest, matches: Mapping[str, MatchResult], exclude: set[str]
    ) -> Decision:
        if not self.routing.kv_fetch_plans:
            return decision
        target = decision.worker
        outcome, fetch = plan_fetch(
            target,
            self.pool,
            matches,
            req.hashes(target.model_id or "", target.page_size),
            prompt_tokens=len(req.prompt_ids),
            namespace=req.tenant.salt,
            exclude=exclude,
            min_tokens=self.routing.kv_fetch_min_tokens,
            plan_id=f"kvf-{uuid.uuid4().hex[:16]}",
            expires_at_ms=int((time.time() + self.routing.kv_fetch_plan_ttl_s) * 1000),
        )
        if outcome is not None:
            self.metrics.fetch_plan(outcome, fetch.tokens if fetch is not None else 0)
        return decision if fetch is None else dataclasses.replace(decision, fetch=fetch)
