"""The gateway's aiohttp application: ``create_app(config)``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from cache.api.errors import make_error_middleware
from cache.prompt.tokenizer import Tokenizer
from gateway import dashboard, handlers, messages_api, passthrough, responses_api
from gateway.config import GatewayConfig
from gateway.response_store import ResponseStoreConfig, make_response_store
from gateway.state import STATE, GatewayState

log = logging.getLogger(__name__)  # the error middleware logs failures under it


def create_app(
    config: GatewayConfig,
    tokenizer: Tokenizer | None = None,
    responses: ResponseStoreConfig | None = None,
) -> web.Application:
    """``tokenizer``: one already loaded (tests share one); by default it is loaded from ``config.model``.
    ``responses``: the bounds of the stored ``/v1/responses`` (kept beside the index: Redis or in process)."""
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[make_error_middleware(log)])
    app[STATE] = GatewayState(config, tokenizer)
    app[responses_api.RESPONSE_STORE] = make_response_store(
        app[STATE].store, responses or ResponseStoreConfig()
    )

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        async with app[STATE].run():
            yield

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/chat/completions", handlers.chat_completions)
    app.router.add_post("/v1/completions", handlers.completions)
    app.router.add_post("/generate", handlers.generate)
    app.router.add_post("/v1/responses", responses_api.create_response)
    app.router.add_get("/v1/responses/{response_id}", responses_api.get_response)
    app.router.add_delete("/v1/responses/{response_id}", responses_api.delete_response)
    app.router.add_post("/v1/messages", messages_api.create_message)
    passthrough.add_routes(app)  # /v1/embeddings, /v1/tokenize, /v1/detokenize, /tokenize, /detokenize
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_get("/health", handlers.health)
    app.router.add_get("/metrics", handlers.metrics)
    app.router.add_get("/stats", handlers.stats)
    dashboard.add_routes(app)
    app.router.add_get("/admin/workers", handlers.list_workers)
    app.router.add_post("/admin/workers", handlers.add_worker)
    app.router.add_delete("/admin/workers", handlers.remove_worker)
    app.router.add_post("/admin/policy", handlers.set_policy)
    app.router.add_post("/flush_cache", handlers.flush_cache)
    return app


def server_options(config: GatewayConfig) -> dict[str, Any]:
    """aiohttp server settings for the gateway (``web.run_app`` and ``web.AppRunner`` keywords).

    ``keepalive_timeout`` also bounds how long a new connection may take to send its request headers
    (aiohttp arms it when the connection opens and closes an idle one when it fires): a client that
    trickles its headers is cut off after ``client_timeout_s``; its body is bounded by the handler.
    """
    return {"keepalive_timeout": config.client_timeout_s}
