"""From a parsed request to a worker: tokenize as the worker will, hash the prefix blocks, ask the
index who holds them, let the policy choose; and afterwards, teach the index what was routed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from cache.api.errors import ApiError
from cache.index.ops import ApproxOp
from cache.index.store import IndexStore
from cache.prompt.chat import InvalidMessages, chat_prompt_ids
from cache.prompt.tokenizer import Tokenizer
from cache.wire.hashing import block_hashes, namespace_seed
from gateway.config import RoutingConfig, Tenant
from gateway.metrics import GatewayMetrics
from gateway.policies import Decision, Policy, RouteRequest, make_policy
from gateway.workers import Worker, WorkerPool


@dataclass
class PreparedRequest:
    kind: str  # "chat" | "completions" | "generate"
    body: dict[str, Any]
    tenant: Tenant
    prompt_ids: list[int]
    stream: bool
    session_id: str | None
    request_id: str
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
        tokenizer: Tokenizer,
        metrics: GatewayMetrics,
    ) -> None:
        self.routing = routing
        self.pool = pool
        self.store = store
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.policy: Policy = make_policy(routing.policy, routing)

    def set_policy(self, name: str) -> None:
        self.policy = make_policy(name, self.routing)

    # -- request -> token ids ------------------------------------------------------------------------
    def prompt_ids(self, kind: str, body: dict[str, Any]) -> list[int]:
        try:
            if kind == "chat":
                return chat_prompt_ids(self.tokenizer, body.get("messages"))
            prompt = body.get("prompt") if kind == "completions" else body.get("text", body.get("input_ids"))
            if kind == "generate" and prompt is None:
                raise ApiError(400, "either 'text' or 'input_ids' is required", param="text")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]  # a batch of one
            if isinstance(prompt, str):
                ids = self.tokenizer.encode(prompt, add_special_tokens=True)  # as the engine server does
            elif isinstance(prompt, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt
            ):
                ids = list(prompt)
            else:
                raise ApiError(400, "'prompt' must be a string or an array of token ids", param="prompt")
        except InvalidMessages as exc:
            raise ApiError(400, str(exc), param="messages") from None
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt" if kind != "chat" else "messages")
        return ids

    # -- routing -------------------------------------------------------------------------------------
    async def choose(self, req: PreparedRequest, exclude: set[str]) -> Decision:
        candidates = [w for w in self.pool.available() if w.worker_id not in exclude]
        if req.kind == "generate":
            candidates = [w for w in candidates if w.native]
        if not candidates:
            raise ApiError(503, "no healthy worker can take this request; retry shortly")
        route = RouteRequest(prompt_tokens=len(req.prompt_ids), session_id=req.session_id)
        for model_id, page_size in {(w.model_id or "", w.page_size) for w in candidates}:
            matches = self.store.match(req.hashes(model_id, page_size))
            route.matches.update(matches)
        if req.session_id is not None:
            route.pinned_worker = await self.store.pinned_worker(self._session_key(req))
        decision = self.policy.choose(route, candidates)
        self.metrics.decision(self.policy.name, decision.reason, decision.worker.worker_id)
        await self._claim(req, decision.worker)
        return decision

    async def _claim(self, req: PreparedRequest, worker: Worker) -> None:
        """Record at once that ``worker`` is about to hold this prompt's blocks (an expiring entry;
        the worker's KV events confirm it, or the TTL drops it)."""
        hashes = req.hashes(worker.model_id or "", worker.page_size)
        if hashes:
            ttl = self.routing.in_flight_claim_ttl_s if worker.precise else self.routing.approx_ttl_s
            await self.store.append(ApproxOp(worker.worker_id, None, hashes, time.time() + ttl))

    async def routed(self, req: PreparedRequest, worker: Worker, reply_text: str) -> None:
        """After a successful request: pin its session, and for a worker that publishes no KV events,
        insert what it now most likely holds (prompt and reply) as an approximate, expiring entry."""
        if req.session_id is not None:
            await self.store.pin_session(self._session_key(req), worker.worker_id, self.routing.session_ttl_s)
        if worker.precise or not reply_text:
            return  # the prompt was claimed at routing time
        ids = req.prompt_ids + self.tokenizer.encode(reply_text)
        seed = namespace_seed(worker.model_id or "", req.tenant.salt)
        hashes = block_hashes(ids, worker.page_size, seed=seed)
        if hashes:
            expires = time.time() + self.routing.approx_ttl_s
            await self.store.append(ApproxOp(worker.worker_id, None, hashes, expires))

    @staticmethod
    def _session_key(req: PreparedRequest) -> str:
        return f"{req.tenant.name}:{req.session_id}"  # tenants never share pins
