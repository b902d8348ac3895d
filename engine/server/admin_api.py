"""Operational endpoints, shaped as SGLang's so its router and tools can manage this worker.

SGLang's router registers a worker by probing ``/health`` and reading ``/server_info`` and
``/model_info`` (older routers: ``/get_server_info``, ``/get_model_info``); both spellings answer.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from cache.api.sampling import SamplingParams
from cache.wire.hashing import HASH_SCHEME
from engine.server.state import STATE, ServerState

VERSION = "prefixgate-0.1.0"
# Names this process: a worker restarted on the same URL answers a new one, which tells the gateway its
# cache is gone (``/server_info`` and every ``/get_load`` entry carry it). Fixed for the process's life.
INSTANCE_ID = uuid.uuid4().hex[:16]


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/health", health)
    r.add_get("/health_generate", health_generate)
    for path in ("/get_server_info", "/server_info"):
        r.add_get(path, server_info)
    for path in ("/get_model_info", "/model_info"):
        r.add_get(path, model_info)
    r.add_get("/get_load", get_load)
    r.add_get("/load_profile", load_profile)
    r.add_route("GET", "/flush_cache", flush_cache)
    r.add_route("POST", "/flush_cache", flush_cache)
    r.add_get("/metrics", metrics)


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.Response(status=200 if state.ready and not state.draining else 503)


async def health_generate(request: web.Request) -> web.Response:
    """Healthy when the engine produces a token; a busy engine is healthy by definition (as SGLang)."""
    state = request.app[STATE]
    if not state.ready or state.draining:
        return web.Response(status=503)
    if state.engine.num_requests:
        return web.Response(status=200)
    prompt = [state.info.bos_token_id or 0]

    async def one_token() -> None:
        stream = state.engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0.0))
        async for chunk in stream:
            if chunk.finished:
                break
        await stream.aclose()

    try:
        await asyncio.wait_for(one_token(), state.settings.health_generate_timeout_s)
    except Exception:
        return web.Response(status=503)
    return web.Response(status=200)


def load(state: ServerState) -> dict[str, Any]:
    stats = state.engine.stats
    return {
        "dp_rank": 0,
        "instance_id": INSTANCE_ID,
        "num_reqs": stats.num_running + stats.num_waiting,
        "num_running_reqs": stats.num_running,
        "num_waiting_reqs": stats.num_waiting,
        "num_tokens": stats.tokens_held,
        "num_used_pages": stats.pages_used,
        "num_cached_pages": stats.pages_cached,
    }


async def server_info(request: web.Request) -> web.Response:
    state = request.app[STATE]
    info, settings = state.info, state.settings
    return web.json_response(
        {
            "model_path": info.model_path,
            "served_model_name": info.model_id,
            "model_id": info.model_id,
            "tokenizer_path": info.model_path,
            "host": settings.host,
            "port": settings.port,
            "context_length": info.max_model_len,
            "page_size": info.page_size,
            "max_total_tokens": info.num_pages * info.page_size,
            "max_total_host_tokens": state.engine.stats.host_pages_total * info.page_size,
            "max_running_requests": info.max_running,
            "chunked_prefill_size": info.max_batch_tokens,
            "max_prefill_tokens": info.max_batch_tokens,
            "device": info.device,
            "dtype": info.dtype,
            "dp_size": 1,
            "tp_size": 1,
            "kv_events_endpoint": settings.kv_events_endpoint,
            "kv_events_curve_public_key": state.publisher.curve_public_key if state.publisher else None,
            "kv_block_hash": HASH_SCHEME,
            "instance_id": INSTANCE_ID,
            # SGLang's name for the role ("null" = mixed); the gateway builds its P and D pools from it
            "disaggregation_mode": "null" if settings.role == "mixed" else settings.role,
            "kv_transfer": state.transfer is not None,
            "internal_states": [load(state)],
            "version": VERSION,
        }
    )


async def model_info(request: web.Request) -> web.Response:
    info = request.app[STATE].info
    arch = info.architecture
    return web.json_response(
        {
            "model_path": info.model_path,
            "tokenizer_path": info.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "model_type": arch,
            "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(arch, arch)],
        }
    )


async def get_load(request: web.Request) -> web.Response:
    return web.json_response([load(request.app[STATE])])


async def load_profile(request: web.Request) -> web.Response:
    """What this worker measured of its own speed (``cache.planning.load_profile``): the gateway sizes
    prefill and decode pools from it (P:D advice)."""
    return web.json_response(request.app[STATE].engine.stats.load_profile.to_json())


async def flush_cache(request: web.Request) -> web.Response:
    """Refused (400) while requests run, as SGLang does; the prefix cache then reports AllBlocksCleared."""
    state = request.app[STATE]
    # Runs on the engine thread between steps, so it never races a step or a pending abort.
    ok = not state.tracker and not state.engine.num_requests and await state.engine.flush_cache()
    message = "Cache flushed.\n" if ok else "Cache not flushed: requests are running. Retry when idle.\n"
    return web.Response(text=message, status=200 if ok else 400)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
