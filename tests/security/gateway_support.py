"""Fixtures for the gateway's security tests: a hostile upstream worker (a small aiohttp app that
misbehaves as scripted) behind a real gateway on loopback. No model, no processes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cache.api.errors import error_body
from cache.api.sse import send_done, send_event
from cache.prompt.tokenizer import Tokenizer
from gateway.config import GatewayConfig, RoutingConfig
from gateway.state import STATE, GatewayState
from tests.gateway.conftest import running_gateway

CHAT = "/v1/chat/completions"
BODY = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 3}
POISON_MAX_TOKENS = 13  # a request with this max_tokens makes a "poison" worker fail (as 1e-300 did)
REPLY = {
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8},
}


@pytest.fixture(scope="session", name="tokenizer")
def shared_tokenizer(smollm2_tokenizer: Tokenizer) -> Tokenizer:
    """The bundled model's tokenizer, loaded once a session (import this into a test module to use it)."""
    return smollm2_tokenizer


@dataclass
class HostileWorker:
    """An OpenAI-compatible upstream that answers ``/v1/chat/completions`` as ``mode`` says:

    ``ok``; ``poison`` (500 for requests with ``max_tokens == POISON_MAX_TOKENS``, else ok); ``secret_500``
    (a 500 whose body holds internals); ``html_200``, ``html_400``; ``bad_json_200``; ``huge_body``
    (``huge_bytes`` of JSON); ``long_sse_line`` and ``bad_sse_json`` (a good chunk, then a bad line);
    ``bad_usage`` (usage counts that are strings); ``redirect`` (307 to ``redirect_to``, also on its
    probes); ``reject_400`` (refuses every prompt as too long, as an engine does).
    ``context_length`` is what ``/get_server_info`` reports (None: no such route, a plain upstream)."""

    mode: str = "ok"
    context_length: int | None = None
    redirect_to: str = ""
    huge_bytes: int = 2 * 2**20
    bodies: list[dict[str, Any]] = field(default_factory=list)
    probes: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/get_server_info", self.server_info)
        app.router.add_post(CHAT, self.complete)
        return app

    async def models(self, request: web.Request) -> web.StreamResponse:
        self.probes.append(request.path)
        if self.mode == "redirect":
            raise web.HTTPTemporaryRedirect(self.redirect_to + request.path)
        return web.json_response({"object": "list", "data": [{"id": "stub-model", "object": "model"}]})

    async def server_info(self, request: web.Request) -> web.StreamResponse:
        self.probes.append(request.path)
        if self.mode == "redirect":
            raise web.HTTPTemporaryRedirect(self.redirect_to + request.path)
        if self.context_length is None:
            raise web.HTTPNotFound()
        return web.json_response({"served_model_name": "stub-model", "context_length": self.context_length})

    async def complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        mode = self.mode
        if mode == "poison" and body.get("max_tokens") == POISON_MAX_TOKENS:
            return web.json_response(error_body(500, "engine step failed"), status=500)
        if mode == "secret_500":
            detail = "Traceback: File /srv/secret/engine.py, password=SECRET-123"
            return web.Response(text=detail, status=500)
        if mode == "redirect":
            raise web.HTTPTemporaryRedirect(self.redirect_to + CHAT)
        if mode == "reject_400":
            error = error_body(400, "prompt too long", param="messages", code="context_length_exceeded")
            return web.json_response(error, status=400)
        if mode in ("html_200", "html_400"):
            return web.Response(text="<html>internal</html>", content_type="text/html", status=int(mode[-3:]))
        if mode == "bad_json_200":
            return web.Response(text='{"choices": [', content_type="application/json")
        if mode == "huge_body":
            return web.Response(
                body=b'{"x": "' + b"a" * self.huge_bytes + b'"}', content_type="application/json"
            )
        if mode == "bad_usage":
            usage = {"prompt_tokens": "seven", "completion_tokens": [1], "prompt_tokens_details": "x"}
            return web.json_response({**REPLY, "usage": usage})
        if not body.get("stream"):
            return web.json_response(REPLY)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await send_event(response, {"choices": [{"index": 0, "delta": {"content": "Hel"}}]})
        if mode == "long_sse_line":
            await response.write(b"data: " + b"x" * (4 * 2**20) + b"\n\n")
        elif mode == "bad_sse_json":
            await response.write(b"data: {not json\n\n")
        await send_done(response)
        return response


@dataclass
class Setup:
    base: str
    state: GatewayState
    session: aiohttp.ClientSession
    stubs: list[HostileWorker]
    servers: list[TestServer]


@contextlib.asynccontextmanager
async def gateway_over(tokenizer: Tokenizer, *stubs: HostileWorker, **config: Any) -> AsyncIterator[Setup]:
    """``stubs`` behind a real gateway (round robin, no health checks unless a test asks)."""
    async with contextlib.AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(TestServer(s.app(), host="127.0.0.1")) for s in stubs]
        config.setdefault("routing", RoutingConfig(policy="round_robin"))
        config.setdefault("health_interval_s", 3600)
        gateway_config = GatewayConfig(workers=tuple(str(s.make_url("")) for s in servers), **config)
        base, app = await stack.enter_async_context(running_gateway(gateway_config, tokenizer))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        yield Setup(base, app[STATE], session, list(stubs), servers)
