"""The request pipeline after parsing: choose a worker -> forward -> retry on another -> record -> routed.

Which outcomes count against a worker (its circuit breaker):
* a broken transport (refused, reset, timed out, a redirect, an unreadable answer) before the first byte,
  and a stream it broke off: at once;
* an HTTP 5xx before the first byte: only once another worker has served the same request, which proves
  the request was sound. A request that gets a 5xx from every worker tried is taken to be what failed
  (hostile parameters, a poison prompt) and is charged to nobody, so a few such requests can never open
  every worker's circuit; a worker that fails everything is caught by its health check instead.
Never: a 4xx (the request's fault, relayed as is) or a client that went away (a cancelled handler, or
``Relayed.client_gone``); such requests are recorded with status 499, as nginx does.

The prompt's blocks are claimed in the index only once a worker has accepted the request (a 2xx status,
``UpstreamCall.on_accepted``), so rejected requests never evict real entries.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from cache.api.errors import ApiError
from cache.api.replies import Usage
from gateway.disaggregation import Disaggregation, Leg
from gateway.fetch_plans import PlannedFetch
from gateway.metrics import CLIENT_CLOSED, GatewayMetrics, RequestRecord
from gateway.policies import Decision
from gateway.proxy import Proxy, Relayed, UpstreamCall, UpstreamFailed
from gateway.retention import openai_pins
from gateway.router import PreparedRequest, Router
from gateway.translation import ReplyTranslator
from gateway.workers import Worker, WorkerPool

log = logging.getLogger(__name__)

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "generate": "/generate"}


# Fields only the gateway sets: a client's would make a worker pull KV from a peer of the client's choosing
# (``kv_fetch_plan``), join a disaggregated transfer (vLLM's ``kv_transfer_params``, SGLang's bootstrap)
# or hold pages past the gateway's retention bounds (``kv_pin``, ``gateway.retention``).
GATEWAY_ONLY_FIELDS = (
    "kv_fetch_plan",
    "kv_pin",
    "kv_transfer_params",
    "bootstrap_host",
    "bootstrap_port",
    "bootstrap_room",
)


def upstream_body(
    req: PreparedRequest, fetch: PlannedFetch | None = None, kv_pins: list[dict[str, Any]] | None = None
) -> tuple[bytes, bool]:
    """The body to send upstream, and whether the gateway asked for a usage chunk the client did not
    (so the proxy strips it). ``cache_salt`` is always the gateway's: the tenant's derived salt (vLLM's
    field; the worker keys its prefix cache by it, as the gateway's hashes do), or absent when the tenant
    has none. A client's own ``cache_salt`` and ``GATEWAY_ONLY_FIELDS`` never reach a worker; ``fetch``:
    the gateway's own ``kv_fetch_plan`` for this worker (``gateway.fetch_plans``); ``kv_pins``: its
    ``kv_pin`` (``gateway.retention``)."""
    body: dict[str, Any] = dict(req.body)
    for name in ("cache_salt", *GATEWAY_ONLY_FIELDS):
        body.pop(name, None)
    if req.tenant.salt:
        body["cache_salt"] = req.tenant.salt
    if fetch is not None:
        body["kv_fetch_plan"] = fetch.to_json()
    if kv_pins:
        body["kv_pin"] = kv_pins
    ask_usage = req.stream and req.kind != "generate"  # usage carries cached_tokens, for the hit rate
    if ask_usage:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return orjson.dumps(body), ask_usage and not req.include_usage


class Dispatcher:
    def __init__(
        self, router: Router, pool: WorkerPool, proxy: Proxy, metrics: GatewayMetrics, max_retries: int
    ) -> None:
        self.router, self.pool, self.proxy, self.metrics = router, pool, proxy, metrics
        self.max_retries = max_retries
        self.disaggregation = Disaggregation(router, pool, proxy, metrics, PATHS)

    async def dispatch(
        self,
        request: web.Request,
        req: PreparedRequest,
        translator: ReplyTranslator | None = None,
        on_served: Callable[[Worker], Awaitable[None]] | None = None,
        kv_pins: list[dict[str, Any]] | None = None,
    ) -> web.StreamResponse:
        """``translator``: the client speaks another API; the worker's chat-completions answer is translated
        (``gateway.translation``). ``on_served``: awaited with the worker once it has served the request
        (a status below 400), after the router's own bookkeeping (``Router.routed``). ``kv_pins``: what
        our engine workers retain (``gateway.retention``; default: the body's ``prompt_cache_retention``)."""
        if kv_pins is None and req.kind != "generate":
            kv_pins = openai_pins(req.body, self.router.routing.max_retention_s)
        body, strip_usage = upstream_body(req)
        tried: set[str] = set()
        answered_5xx: list[Worker] = []  # charged only if another worker serves the request
        last_error = "no worker answered"
        decision: Decision | None = None
        leg: Leg | None = None  # the prefill side of a disaggregated request
        recorded = False
        try:
            for attempt in range(self.max_retries + 1):
                decision = await self.router.choose(req, exclude=tried)
                worker = decision.worker
                pins = kv_pins if worker.kind == "prefixgate" else None  # other servers keep their policy
                leg = (
                    await self.disaggregation.arrange(req, decision, body)
                    if self.router.disaggregated
                    else None
                )
                if leg is not None:  # disaggregated: the body arranged for the decode worker
                    attempt_body = leg.body
                elif decision.fetch is None and not pins:
                    attempt_body = body
                else:  # this worker's fetch plan or retention pins go into its copy of the body
                    attempt_body = upstream_body(req, decision.fetch, pins)[0]
                call = UpstreamCall(
                    url=worker.url + PATHS[req.kind],
                    body=attempt_body,
                    request_id=req.request_id,
                    received=req.received,
                    strip_usage=strip_usage,
                    cumulative_text=req.kind == "generate",
                    on_accepted=functools.partial(self.router.claim, req, worker),
                    translator=translator,
                )
                self.router.dispatching(req, worker)
                try:
                    with self.pool.dispatch(worker):
                        try:
                            relayed = await self.proxy.forward(request, call)
                        finally:
                            self.router.dispatched_done(req, worker)
                except UpstreamFailed as exc:
                    if leg is not None:
                        await leg.finish()
                    if exc.answered:
                        answered_5xx.append(worker)
                    else:
                        self.pool.record_failure(worker)
                    tried.add(worker.worker_id)
                    last_error = str(exc)
                    log.warning("request %s: worker %s failed: %s", req.request_id, worker.worker_id, exc)
                    if attempt < self.max_retries and len(tried) < len(self.pool.workers):
                        self.metrics.retries.inc()
                        continue
                    break
                for suspect in answered_5xx:  # this worker served it: theirs was a worker failure
                    self.pool.record_failure(suspect)
                if relayed.worker_failed:
                    self.pool.record_failure(worker)
                else:
                    self.pool.record_success(worker)
                if relayed.client_gone:
                    relayed.status, relayed.error = CLIENT_CLOSED, "the client went away"
                if leg is not None:
                    await leg.finish()
                self._record(req, decision, relayed, leg)
                recorded = True
                if relayed.status < 400:
                    await self.router.routed(req, worker, relayed.text)
                    if on_served is not None:
                        await on_served(worker)
                return relayed.response
        except asyncio.CancelledError:  # the client went away (handler cancellation)
            if leg is not None:
                leg.cancel()
            if decision is not None and not recorded:
                self._record(
                    req, decision, Relayed(web.Response(), CLIENT_CLOSED, error="the client went away")
                )
            raise
        if answered_5xx and len(answered_5xx) == len(tried):
            log.warning(
                "request %s failed with HTTP 5xx on every worker tried: charged to the request, not to them",
                req.request_id,
            )
        raise ApiError(502, f"the request failed on every worker tried (last: {last_error})")

    def _record(
        self, req: PreparedRequest, decision: Decision, relayed: Relayed, leg: Leg | None = None
    ) -> None:
        usage = relayed.usage or Usage()
        latency_s = time.perf_counter() - req.received
        completion_tokens = usage.completion_tokens or 0
        self.metrics.record(
            RequestRecord(
                time=time.time(),
                request_id=req.request_id,
                tenant=req.tenant.name,
                worker=decision.worker.worker_id,
                policy=self.router.policy.name,
                reason=decision.reason,
                status=relayed.status,
                stream=req.stream,
                prompt_tokens=usage.prompt_tokens or len(req.prompt_ids),
                predicted_cached_tokens=decision.predicted_cached_tokens,
                predicted_host_tokens=decision.predicted_host_tokens,
                predicted_disk_tokens=decision.predicted_disk_tokens,
                cached_tokens=usage.cached_tokens,
                completion_tokens=completion_tokens,
                ttft_s=relayed.ttft_s,
                latency_s=latency_s,
                error=relayed.error,
                tpot_s=RequestRecord.time_per_output_token(relayed.ttft_s, latency_s, completion_tokens),
                fetch_source=decision.fetch.source if decision.fetch else None,
                fetch_planned_tokens=decision.fetch.tokens if decision.fetch else 0,
                kv_fetch=usage.kv_fetch,
                prefill_worker=leg.prefill_worker.worker_id if leg and leg.prefill_worker else None,
                pd_path=leg.path if leg is not None else None,
            ),
            relayed.inter_token_s,
        )
