"""Thin HTTP handlers: authenticate, parse (``cache.api.requests``, shared with the engine), dispatch."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cache.api.errors import ApiError
from cache.api.fields import read_json
from cache.api.requests import GenerationRequest, Kind, ServingLimits, parse_request
from cache.index.ops import ClearedOp
from gateway.config import Tenant
from gateway.dispatch import GATEWAY_ONLY_FIELDS
from gateway.policies import POLICIES
from gateway.prompt_bounds import min_prompt_tokens
from gateway.router import PreparedRequest
from gateway.state import STATE, GatewayState
from gateway.tenancy import authenticate, require_admin, require_observer
from gateway.worker_urls import check_worker_url


async def _read_body(request: web.Request, timeout_s: float) -> dict[str, Any]:
    """The JSON body, or a 408 for a client that trickles it (headers are bounded by the server's
    ``keepalive_timeout``, see ``gateway.app.server_options``)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await read_json(request)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:.0f} s") from None


async def _parse(state: GatewayState, kind: Kind, body: dict[str, Any]) -> GenerationRequest:
    """``parse_request`` against the workers' context, off the event loop (tokenizing a long prompt takes
    seconds; the ``Tokenizer`` is immutable and shared by the pool's threads). A prompt that cannot fit
    whatever it tokenizes to is refused first, without tokenizing it."""
    context = state.context_limit(kind)
    if context is not None:
        at_least = min_prompt_tokens(kind, body, state.bytes_per_token)
        if at_least >= context:
            raise ApiError(
                400,
                f"the prompt has at least {at_least} tokens; this model's context is {context} tokens",
                param="messages" if kind == "chat" else "prompt" if kind == "completions" else "text",
                code="context_length_exceeded",
            )
    limits = ServingLimits(vocab_size=state.tokenizer.vocab_size, max_model_len=context)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(state.tokenize_pool, parse_request, kind, body, state.tokenizer, limits)


async def read_request(request: web.Request) -> tuple[GatewayState, Tenant, dict[str, Any]]:
    """The gateway, the caller's tenant (401 without a valid key) and the JSON body (408/413 bounded)."""
    state = request.app[STATE]
    tenant = authenticate(request, state.config.api_keys)
    return state, tenant, await _read_body(request, state.config.client_timeout_s)


async def prepare(
    request: web.Request,
    state: GatewayState,
    tenant: Tenant,
    kind: Kind,
    body: dict[str, Any],
    session_id: str | None = None,
) -> PreparedRequest:
    """``body`` (the model defaulted, or a 404 for one no worker serves) parsed as the worker will parse
    it: a ``PreparedRequest`` for the dispatcher. ``session_id`` defaults to ``prompt_cache_key``, ``user``
    or the ``X-Session-ID`` header."""
    served = state.served_models()
    model = body.get("model")
    if kind != "generate":
        if model is None and served:
            body["model"] = served[0]
        elif not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", param="model")
        elif served and model not in served:
            raise ApiError(
                404,
                f"the model '{model}' does not exist; served: {', '.join(served)}",
                param="model",
                code="model_not_found",
            )
    # Only the gateway may ask a worker to move KV: a client's fields for it are dropped unread.
    for name in GATEWAY_ONLY_FIELDS:
        body.pop(name, None)
    # The gateway's limits leave engine_features off: n > 1, tools and logprobs go to the upstream, which
    # accepts or refuses them; the worker checks the body again with its own limits.
    parsed = await _parse(state, kind, body)
    if session_id is None:
        session_id = body.get("prompt_cache_key") or body.get("user") or request.headers.get("X-Session-ID")
    if session_id is not None and not isinstance(session_id, str):
        raise ApiError(400, "'prompt_cache_key' and 'user' must be strings", param="user")
    return PreparedRequest(
        kind=kind,
        body=body,
        tenant=tenant,
        prompt_ids=parsed.prompt_ids,
        stream=parsed.stream,
        session_id=session_id,
        request_id=request.headers.get("X-Request-ID") or f"gw-{uuid.uuid4().hex[:16]}",
        include_usage=parsed.include_usage,
    )


async def _proxied(request: web.Request, kind: Kind) -> web.StreamResponse:
    state, tenant, body = await read_request(request)
    req = await prepare(request, state, tenant, kind, body)
    return await state.dispatcher.dispatch(request, req)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _proxied(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _proxied(request, "completions")


async def generate(request: web.Request) -> web.StreamResponse:
    return await _proxied(request, "generate")


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    authenticate(request, state.config.api_keys)
    data = [
        {"id": m, "object": "model", "created": int(state.started), "owned_by": "prefixgate"}
        for m in state.served_models()
    ]
    return web.json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    available = len(state.pool.available())
    store = state.store.status
    status = "ok" if available and store == "healthy" else ("degraded" if available else "unavailable")
    body = {
        "status": status,
        "workers_available": available,
        "workers": len(state.pool.workers),
        "store": store,
    }
    return web.json_response(body, status=200 if available else 503)


def _observer(request: web.Request) -> GatewayState:
    state = request.app[STATE]
    cfg = state.config
    require_observer(request, cfg.api_keys, cfg.admin_key, cfg.metrics_key)
    return state


async def metrics(request: web.Request) -> web.Response:
    state = _observer(request)
    state.refresh_gauges()
    return web.Response(
        body=generate_latest(state.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def stats(request: web.Request) -> web.Response:
    state = _observer(request)
    since = request.query.get("since")
    try:
        since_t = float(since) if since is not None else None
    except ValueError:
        raise ApiError(400, f"'since' must be a unix time in seconds, got {since!r}", param="since") from None
    if since_t is not None and not math.isfinite(since_t):
        raise ApiError(400, "'since' must be a finite unix time", param="since")
    return web.json_response(await state.stats(since_t))


# -- admin -------------------------------------------------------------------------------------------
def _admin(request: web.Request) -> GatewayState:
    state = request.app[STATE]
    require_admin(request, state.config.admin_key)
    return state


async def list_workers(request: web.Request) -> web.Response:
    state = _admin(request)
    return web.json_response({"workers": [w.describe() for w in state.pool]})


async def add_worker(request: web.Request) -> web.Response:
    state = _admin(request)
    url = check_worker_url((await read_json(request)).get("url"), state.config.allowed_worker_urls)
    worker = await state.add_worker(url)
    return web.json_response(worker.describe(), status=201 if worker.healthy else 202)


async def remove_worker(request: web.Request) -> web.Response:
    state = _admin(request)
    worker_id = request.query.get("id") or request.query.get("url", "")
    if not await state.remove_worker(worker_id.rstrip("/")):
        raise ApiError(404, f"no worker {worker_id!r}", param="id")
    return web.json_response({"removed": worker_id})


async def set_policy(request: web.Request) -> web.Response:
    state = _admin(request)
    name = (await read_json(request)).get("policy")
    if name not in POLICIES:
        raise ApiError(400, f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}", param="policy")
    state.router.set_policy(name)
    return web.json_response({"policy": name, "at": time.time()})


async def flush_cache(request: web.Request) -> web.Response:
    """SGLang's ``POST /flush_cache``, fanned out: every native worker drops its prefix cache (200 only
    if all did; a busy worker refuses, as SGLang's does). Admin-only: it costs every tenant its hits."""
    state = _admin(request)
    results = await state.pool.flush_caches()
    # The index forgets what they held (workers with KV events also say so, with AllBlocksCleared).
    await state.store.append_many(ClearedOp(worker_id) for worker_id, ok in results.items() if ok)
    ok = all(results.values())
    return web.json_response({"flushed": results}, status=200 if ok else 400)
