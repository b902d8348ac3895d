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

from aiohttp import web

from cache.api.errors import make_error_middleware
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.loader import LoadedModel, load_model
from engine.server import admin_api, openai_api, sglang_api, tokenize_api, transfer_api
from engine.server.kv_events import (
    KVEventPublisher,
    load_curve_secret_key,
    make_block_hasher,
    make_namespace_hash,
)
from engine.server.metrics import ServerMetrics
from engine.server.state import STATE, ServerSettings, ServerState
from engine.transfer.service import TransferService

log = logging.getLogger(__name__)


def load_engine(
    config: EngineConfig, settings: ServerSettings, loaded: LoadedModel | None = None
) -> tuple[AsyncEngine, KVEventPublisher | None]:
    """An engine whose pages are named by ``cache.wire.hashing`` and, if asked, a KV event publisher.
    ``loaded``: a model already loaded from ``config`` (loaded here if None). Raises ValueError for
    KV event settings that would expose the events (checked before the model loads)."""
    publisher = None
    if settings.kv_events_endpoint:
        secret = None
        if settings.kv_events_curve_secret_key_file:
            secret = load_curve_secret_key(settings.kv_events_curve_secret_key_file)[1]
        publisher = KVEventPublisher(
            settings.kv_events_endpoint,
            config.page_size,
            include_token_ids=settings.kv_events_token_ids,
            curve_secret_key=secret,
            curve_clients_dir=settings.kv_events_curve_clients_dir,
            allow_remote=settings.kv_events_allow_remote,
        )
    loaded = loaded or load_model(config)
    config = dataclasses.replace(config, model_id=loaded.model_id)
    engine = LLMEngine(
        config,
        loaded,
        hasher=make_block_hasher(loaded.model_id, config.page_size),
        namespace_hash=make_namespace_hash(loaded.model_id),
        listener=publisher,
    )
    return AsyncEngine(engine), publisher


def create_app(
    engine: AsyncEngine,
    settings: ServerSettings,
    publisher: KVEventPublisher | None = None,
    transfer: TransferService | None = None,
) -> web.Application:
    """One app per engine at a time: its step loop owns the engine while the app runs. ``transfer``:
    a KV transfer service (built from ``settings.kv_transfer`` when that is set and this is None)."""
    app = web.Application(middlewares=[make_error_middleware(log)], client_max_size=64 * 2**20)
    if transfer is None and settings.kv_transfer is not None:
        transfer = TransferService(engine, settings.kv_transfer)
    app[STATE] = ServerState(engine, settings, ServerMetrics(engine), publisher, transfer)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_drain)
    openai_api.add_routes(app)
    sglang_api.add_routes(app)
    admin_api.add_routes(app)
    tokenize_api.add_routes(app)
    transfer_api.add_routes(app)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    if state.publisher is not None:
        state.publisher.start()
    state.engine.start()
    if state.transfer is not None:
        await state.transfer.start()
        log.info(
            "KV transfer: %s segment %s", state.transfer.transport.name, state.transfer.transport.segment
        )
    state.ready = True
    info = state.info
    log.info(
        "engine worker ready: model %s, %d KV pages of %d tokens",
        info.model_id,
        info.num_pages,
        info.page_size,
    )
    try:
        yield
    finally:
        state.ready = False
        if state.transfer is not None:
            await state.transfer.close()
        await state.engine.stop()
        if state.publisher is not None:
            await asyncio.to_thread(state.publisher.close)


async def _drain(app: web.Application) -> None:
    state = app[STATE]
    state.draining = True
    deadline = time.monotonic() + state.settings.shutdown_grace_s
    if state.tracker:
        grace = state.settings.shutdown_grace_s
        log.info("shutting down: waiting up to %.0f s for %d requests", grace, len(state.tracker))
    while state.tracker and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if state.tracker:
        log.warning("shutting down: ending %d unfinished requests with an error", len(state.tracker))
    await state.engine.stop()  # fails what is left; their streams end with an error event
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
    app[STATE].bound_port = bound
    return runner, bound
