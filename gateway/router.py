"""From a parsed request to a worker: hash the prompt's prefix blocks in each worker's namespace, ask the
index who holds them, let the policy choose; and afterwards, teach the index what was routed.

The prompt ids come from ``cache.api.requests.parse_request``, the parser the engine uses too, so the
gateway hashes exactly the tokens the worker will compute."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from cache.api.errors import ApiError
from cache.api.requests import Kind
from cache.index.ops import ApproxOp
from cache.index.radix_index import RadixIndex, RadixIndexConfig
from cache.index.store import IndexStore
from cache.prompt.tokenizer import Tokenizer
from cache.wire.hashing import block_hashes, namespace_seed
from gateway.config import RoutingConfig, Tenant
from gateway.fetch_plans import FetchPlanner
from gateway.metrics import GatewayMetrics
from gateway.policies import Decision, Policy, RouteRequest, make_policy
from gateway.shared_state import SharedState
from gateway.workers import Worker, WorkerPool

DISPATCHED_MAX_BLOCKS = 100_000  # prefixes of requests sent but not yet accepted, this replica only


@dataclass
class PreparedRequest:
    """A parsed request on its way through the gateway; ``body`` is forwarded (the gateway's additions
    aside) as the client sent it, ``prompt_ids`` are what ``cache.api.requests.parse_request`` made of it."""

    kind: Kind
    body: dict[str, Any]
    tenant: Tenant
    prompt_ids: list[int]
    stream: bool
    session_id: str | None
    request_id: str
    include_usage: bool = False  # the client asked for the usage chunk (``stream_options.include_usage``)
    received: float = field(default_factory=time.perf_counter)
    _hashes: dict[tuple[str, int], list[int]] = field(default_factory=dict)

    def hashes(self, model_id: str, page_size: int) -> list[int]:
        """Chained block hashes in the worker's namespace (model id + tenant salt), memoised."""
        key = (model_id, page_size)
        if key not in self._hashes:
            seed = namespace_seed(model_id, self.tenant.salt)
            self._hashes[key] = block_hashes(self.prompt_ids, page_size, seed=seed)
        return self._hashes[key]


class Router:
    def __init__(
        self,
        routing: RoutingConfig,
        pool: WorkerPool,
        store: IndexStore,
        shared: SharedState,
        tokenizer: Tokenizer,
        metrics: GatewayMetrics,
    ) -> None:
        self.routing = routing
        self.pool = pool
        self.store = store
        self.shared = shared
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.policy: Policy = make_policy(routing.policy, routing)
        self.fetch_planner = FetchPlanner(routing, pool, metrics)
        self._dispatched = RadixIndex(RadixIndexConfig(max_blocks=DISPATCHED_MAX_BLOCKS))
        # Disaggregated pools: prefill workers by ``policy`` (cache-aware: prefill is where a cached
        # prefix saves compute), decode workers by load, a session keeping its decode worker.
        self.decode_policy: Policy = make_policy("session", routing)

    def set_policy(self, name: str) -> None:
        self.policy = make_policy(name, self.routing)

    # -- routing -------------------------------------------------------------------------------------
    @property
    def disaggregated(self) -> bool:
        """Prefill workers are attached: requests go to a decode worker, long prompts prefilled first
        on a prefill worker (``gateway.disaggregation``)."""
        return any(w.role == "prefill" for w in self.pool)

    async def choose(self, req: PreparedRequest, exclude: set[str], prefill: bool = False) -> Decision:
        """A worker for ``req``: one that generates (mixed or decode), or with ``prefill`` a prefill
        worker (``ApiError`` 503 when none is available)."""
        available = [w for w in self.pool.available() if w.worker_id not in exclude]
        candidates = [w for w in available if (w.role == "prefill") == prefill]
        if req.kind == "generate":
            candidates = [w for w in candidates if w.native]
        if not candidates:
            raise ApiError(503, "no healthy worker can take this request; retry shortly")
        route = RouteRequest(prompt_tokens=len(req.prompt_ids), session_id=req.session_id)
        for model_id, page_size in {(w.model_id or "", w.page_size) for w in candidates}:
            hashes = req.hashes(model_id, page_size)
            route.matches.update(self.store.match(hashes))
            for worker_id, pending in self._dispatched.match(hashes).items():
                known = route.matches.get(worker_id)
                if known is None or pending.blocks > known.blocks:
                    route.matches[worker_id] = pending
        if req.session_id is not None:
            route.pinned_worker = await self.shared.pinned_worker(self._session_key(req))
        policy = self.decode_policy if self.disaggregated and not prefill else self.policy
        decision = policy.choose(route, candidates)
        self.metrics.decision(policy.name, decision.reason, decision.worker.worker_id)
        if not self.disaggregated:  # there a request's KV comes from its prefill leg instead
            decision = self.fetch_planner.attach(decision, req, route.matches, exclude)
        return decision

    def dispatching(self, req: PreparedRequest, worker: Worker) -> None:
        """``req`` is being sent to ``worker``: until the worker accepts it (``claim``), which for a stream
        is after its prefill, a request with the same prefix should still follow it there. Kept in this
        replica's own short-lived index, never the shared one: a request the worker then refuses costs a
        stale hint here for ``in_flight_claim_ttl_s``, and evicts nothing real."""
        hashes = req.hashes(worker.model_id or "", worker.page_size)
        if hashes:
            expires = time.time() + self.routing.in_flight_claim_ttl_s
            self._dispatched.insert_approximate(worker.worker_id, None, hashes, expires)

    def dispatched_done(self, req: PreparedRequest, worker: Worker) -> None:
        """The worker answered (accepted, refused or failed): the shared index speaks for it from here
        (claims, KV events), so the hint goes; a lingering one would outlive an eviction it cannot see."""
        hashes = req.hashes(worker.model_id or "", worker.page_size)
        if hashes:
            self._dispatched.removed(worker.worker_id, hashes)

    async def claim(self, req: PreparedRequest, worker: Worker) -> None:
        """Record that ``worker`` is about to hold this prompt's blocks (an expiring entry; the worker's
        KV events confirm it, or the TTL drops it). Called once the worker accepted the request, never
        at routing time: a request the worker refuses must not evict real entries from the index."""
        hashes = req.hashes(worker.model_id or "", worker.page_size)
        if hashes:
            ttl = self.routing.in_flight_claim_ttl_s if worker.precise else self.routing.approx_ttl_s
            await self.store.append(ApproxOp(worker.worker_id, None, hashes, time.time() + ttl))

    async def routed(self, req: PreparedRequest, worker: Worker, reply_text: str) -> None:
        """After a successful request: pin its session, and for a worker that publishes no KV events,
        insert what it now most likely holds (prompt and reply) as an approximate, expiring entry."""
        if req.session_id is not None:
            await self.shared.pin_session(
                self._session_key(req), worker.worker_id, self.routing.session_ttl_s
            )
        if worker.precise or not reply_text:
            return  # the prompt was claimed when the worker accepted it
        ids = req.prompt_ids + self.tokenizer.encode(reply_text)
        seed = namespace_seed(worker.model_id or "", req.tenant.salt)
        hashes = block_hashes(ids, worker.page_size, seed=seed)
        if hashes:
            expires = time.time() + self.routing.approx_ttl_s
            await self.store.append(ApproxOp(worker.worker_id, None, hashes, expires))

    @staticmethod
    def _session_key(req: PreparedRequest) -> str:
        """A fixed-size key whatever the client sent (64 hex chars); tenants never share pins."""
        assert req.session_id is not None
        return hashlib.sha256(f"{req.tenant.name}\0{req.session_id}".encode()).hexdigest()
