"""The worker's aiohttp application: ``create_app(engine, settings)`` and the engine loader.

Lifecycle (one ``cleanup_ctx``): start the KV event publisher and the engine's step loop; on
shutdown, stop taking requests, give in-flight ones ``shutdown_grace_s`` to finish, then stop the
step loop, which ends whatever is left with an ``EngineError`` that each stream reports as an
error event before ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from cache.api.errors import error_middleware
from cache.prompt.model_files import default_model_path
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.server import admin_api, openai_api, sglang_api
from engine.server.kv_events import KVEventPublisher, make_block_hasher, make_namespace_hash
from engine.server.metrics import ServerMetrics
from engine.server.state import STATE, ServerSettings, ServerState

log = logging.getLogger(__name__)


def served_model_id(config: EngineConfig) -> str:
    """The name the engine serves (as ``LLMEngine`` derives it), needed before loading to seed hashes."""
    path = Path(config.model) if config.model else default_model_path()
    return config.model_id or path.name.removesuffix(".gguf")


def load_engine(config: EngineConfig, settings: ServerSettings) -> tuple[LLMEngine, KVEventPublisher | None]:
    """Load the model with block hashes named by ``cache.wire.hashing`` and, if asked, a KV event publisher."""
    config = dataclasses.replace(config, model_id=served_model_id(config))
    assert config.model_id is not None
    publisher = None
    if settings.kv_events_endpoint:
        publisher = KVEventPublisher(settings.kv_events_endpoint, config.page_size)
    hasher = make_block_hasher(config.model_id, config.page_size)
    engine = LLMEngine(
        config, hasher=hasher, listener=publisher, namespace_hash=make_namespace_hash(config.model_id)
    )
    return engine, publisher


def create_app(
    engine: LLMEngine, settings: ServerSettings, publisher: KVEventPublisher | None = None
) -> web.Application:
    """One app per engine at a time: its step loop owns the engine while the app runs."""
    app = web.Application(middlewares=[error_middleware], client_max_size=64 * 2**20)
    app[STATE] = ServerState(engine, AsyncEngine(engine), settings, ServerMetrics(engine), publisher)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_drain)
    openai_api.add_routes(app)
    sglang_api.add_routes(app)
    admin_api.add_routes(app)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    if state.publisher is not None:
        state.publisher.start()
    state.async_engine.start()
    state.ready = True
    log.info("engine worker ready: model %s, %d KV pages of %d tokens", state.engine.info.model_id,
             state.engine.info.num_pages, state.engine.info.page_size)  # fmt: skip
    try:
        yield
    finally:
        state.ready = False
        await state.async_engine.stop()
        if state.publisher is not None:
            await asyncio.to_thread(state.publisher.close)


async def _drain(app: web.Application) -> None:
    state = app[STATE]
    state.draining = True
    deadline = time.monotonic() + state.settings.shutdown_grace_s
    if state.tracker:
        log.info("shutting down: waiting up to %.0f s for %d requests", state.settings.shutdown_grace_s,
                 len(state.tracker))  # fmt: skip
    while state.tracker and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if state.tracker:
        log.warning("shutting down: ending %d unfinished requests with an error", len(state.tracker))
    await state.async_engine.stop()  # fails what is left; their streams end with an error event
    while state.tracker and time.monotonic() < deadline + 5:
        await asyncio.sleep(0.01)  # let the handlers write their error events


async def start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host:port`` (0 = any free port); returns the runner and the bound port.
    Handler cancellation is on, so a client that disconnects aborts its request."""
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=app[STATE].settings.shutdown_grace_s + 10,
        access_log=None,  # health probes every few seconds would drown the log; metrics count requests
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    return runner, bound
