"""The gateway's pipeline (parse -> dispatch -> proxy -> record) against stub workers on loopback: small
aiohttp apps that answer as OpenAI-compatible servers do, or fail as scripted. No model, no processes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cache.api.errors import error_body
from cache.api.sse import send_done, send_event
from cache.prompt.tokenizer import Tokenizer
from gateway.config import GatewayConfig, RoutingConfig
from gateway.state import STATE, GatewayState
from gateway.workers import Worker
from tests.gateway.conftest import running_gateway

CHAT = "/v1/chat/completions"
PIECES = ["Hel", "lo", " there"]
USAGE = {
    "prompt_tokens": 7,
    "completion_tokens": 3,
    "total_tokens": 10,
    "prompt_tokens_details": {"cached_tokens": 5},
}
BODY = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 3}


@dataclass
class StubWorker:
    """An OpenAI-compatible upstream whose answer a test scripts with ``mode``:
    ``ok``; ``error_500`` and ``bad_request`` before any byte; ``break_mid_stream`` (the connection drops
    after the first chunk); ``endless_stream`` (chunks until the reader goes away, then ``gone`` is set)."""

    mode: str = "ok"
    bodies: list[dict[str, Any]] = field(default_factory=list)  # every completion request it received
    gone: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post(CHAT, self.complete)
        return app

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "stub-model", "object": "model"}]})

    async def complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if self.mode == "error_500":
            return web.json_response(error_body(500, "stub failure"), status=500)
        if self.mode == "bad_request":
            return web.json_response(error_body(400, "stub refuses", param="max_tokens"), status=400)
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(PIECES)}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return web.json_response({"object": "chat.completion", "choices": [choice], "usage": USAGE})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            await self._stream(request, response, body)
        except (ConnectionResetError, asyncio.CancelledError):
            self.gone.set()
            raise
        return response

    async def _stream(self, request: web.Request, response: web.StreamResponse, body: dict) -> None:
        pieces = PIECES if self.mode != "endless_stream" else (f"{i} " for i in range(100_000))
        for piece in pieces:
            await send_event(response, {"choices": [{"index": 0, "delta": {"content": piece}}]})
            if self.mode == "break_mid_stream":
                assert request.transport is not None
                request.transport.abort()  # the worker dies: no terminating chunk, no [DONE]
                return
            if self.mode == "endless_stream":
                await asyncio.sleep(0.005)
        if (body.get("stream_options") or {}).get("include_usage"):
            await send_event(response, {"choices": [], "usage": USAGE})
        await send_done(response)


@dataclass
class Setup:
    base: str  # the gateway's URL
    state: GatewayState
    session: aiohttp.ClientSession  # a client
    stubs: list[StubWorker]
    servers: list[TestServer]

    def worker(self, i: int) -> Worker:
        """The gateway's view of stub ``i``."""
        return list(self.state.pool)[i]


@contextlib.asynccontextmanager
async def gateway_over(
    tokenizer: Tokenizer, *modes: str, handler_cancellation: bool = True
) -> AsyncIterator[Setup]:
    """Stub workers in ``modes`` behind a real gateway, round robin (the first request goes to the first)."""
    async with contextlib.AsyncExitStack() as stack:
        stubs = [StubWorker(mode) for mode in modes]
        servers = [await stack.enter_async_context(TestServer(s.app(), host="127.0.0.1")) for s in stubs]
        config = GatewayConfig(
            workers=tuple(str(s.make_url("")) for s in servers),
            routing=RoutingConfig(policy="round_robin"),
            health_interval_s=3600,  # the tests decide when a worker is down, not a health check
        )
        base, app = await stack.enter_async_context(running_gateway(config, tokenizer, handler_cancellation))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        yield Setup(base, app[STATE], session, stubs, servers)


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def read_events(response: aiohttp.ClientResponse) -> list[Any]:
    """Every ``data:`` payload of an SSE response: JSON objects, and "[DONE]"."""
    events: list[Any] = []
    async for line in response.content:
        if line.startswith(b"data: "):
            payload = line[6:].strip()
            events.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return events


async def test_a_worker_that_fails_before_the_first_byte_is_retried_on_another(tokenizer: Tokenizer) -> None:
    async with gateway_over(tokenizer, "error_500", "ok") as g:
        async with g.session.post(g.base + CHAT, json=BODY) as r:
            assert r.status == 200
            assert (await r.json())["choices"][0]["message"]["content"] == "Hello there"
        assert [len(stub.bodies) for stub in g.stubs] == [1, 1]
        assert [g.worker(i).consecutive_failures for i in (0, 1)] == [1, 0]
        assert g.state.metrics.registry.get_sample_value("prefixgate_retries_total") == 1
        record = g.state.metrics.recent[-1]
        assert record.worker == g.worker(1).worker_id and record.status == 200


async def test_a_worker_that_refuses_connections_is_retried_on_another(tokenizer: Tokenizer) -> None:
    async with gateway_over(tokenizer, "ok", "ok") as g:
        await g.servers[0].close()  # attached while it was up; its port now refuses
        async with g.session.post(g.base + CHAT, json=BODY) as r:
            assert r.status == 200
        assert [len(stub.bodies) for stub in g.stubs] == [0, 1]
        assert [g.worker(i).consecutive_failures for i in (0, 1)] == [1, 0]


async def test_every_worker_failing_is_a_502_charged_to_the_request(tokenizer: Tokenizer) -> None:
    """A 5xx from every worker tried says more about the request than the workers: none is charged."""
    async with gateway_over(tokenizer, "error_500", "error_500") as g:
        async with g.session.post(g.base + CHAT, json=BODY) as r:
            assert r.status == 502
            error = (await r.json())["error"]
        assert error["type"] == "server_error" and "HTTP 500" in error["message"]
        assert "stub failure" not in error["message"]  # the worker's body stays in the gateway's log
        assert [g.worker(i).consecutive_failures for i in (0, 1)] == [0, 0]
        assert not g.state.metrics.recent  # nothing was relayed


async def test_a_stream_that_breaks_is_not_retried_and_ends_with_an_error_event(tokenizer: Tokenizer) -> None:
    async with gateway_over(tokenizer, "break_mid_stream", "ok") as g:
        async with g.session.post(g.base + CHAT, json={**BODY, "stream": True}) as r:
            assert r.status == 200
            events = await read_events(r)
        assert len(events) == 3
        assert events[0]["choices"][0]["delta"]["content"] == PIECES[0]  # what came through, came through
        assert events[1]["error"]["type"] == "server_error" and events[2] == "[DONE]"
        assert [len(stub.bodies) for stub in g.stubs] == [1, 0]  # bytes reached the client: no retry
        assert g.worker(0).consecutive_failures == 1
        record = g.state.metrics.recent[-1]
        assert record.status == 502 and "mid-stream" in (record.error or "")
        assert [g.worker(i).in_flight for i in (0, 1)] == [0, 0]


async def test_the_usage_chunk_is_stripped_unless_the_client_asked_for_it(tokenizer: Tokenizer) -> None:
    async with gateway_over(tokenizer, "ok") as g:
        async with g.session.post(g.base + CHAT, json={**BODY, "stream": True}) as r:
            raw = await r.read()
        assert g.stubs[0].bodies[-1]["stream_options"] == {"include_usage": True}  # asked on its behalf
        assert b"usage" not in raw and b"\n\n\n" not in raw  # the chunk and its separator are gone
        assert raw.endswith(b"data: [DONE]\n\n")
        assert g.state.metrics.recent[-1].cached_tokens == 5  # but read on the way through

        asked = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
        async with g.session.post(g.base + CHAT, json=asked) as r:
            events = await read_events(r)
        assert events[-2]["usage"] == USAGE and events[-1] == "[DONE]"
        text = "".join(e["choices"][0]["delta"]["content"] for e in events[:-1] if e.get("choices"))
        assert text == "Hello there"


async def test_usage_is_recorded_from_the_worker(tokenizer: Tokenizer) -> None:
    async with gateway_over(tokenizer, "ok") as g:
        for stream in (False, True):
            async with g.session.post(g.base + CHAT, json={**BODY, "stream": stream}) as r:
                assert r.status == 200
                await r.read()
            record = g.state.metrics.recent[-1]
            assert (record.stream, record.status, record.error) == (stream, 200, None)
            assert (record.prompt_tokens, record.cached_tokens, record.completion_tokens) == (7, 5, 3)
        assert g.state.metrics.recent[-1].ttft_s is not None  # the stream's first text was timed
        assert g.state.metrics.summary()["cached_tokens"] == 10


async def test_a_worker_4xx_is_relayed_and_not_a_failure(tokenizer: Tokenizer) -> None:
    async with gateway_over(tokenizer, "bad_request", "ok") as g:
        async with g.session.post(g.base + CHAT, json=BODY) as r:
            assert r.status == 400
            assert (await r.json())["error"]["message"] == "stub refuses"
        assert [len(stub.bodies) for stub in g.stubs] == [1, 0]  # the request's fault: no retry
        assert g.worker(0).consecutive_failures == 0
        assert g.state.metrics.recent[-1].status == 400


@pytest.mark.parametrize("handler_cancellation", [True, False], ids=["cancelled", "write_fails"])
async def test_a_client_that_goes_away_is_not_a_worker_failure(
    tokenizer: Tokenizer, handler_cancellation: bool
) -> None:
    """With handler cancellation (how the gateway runs) the handler is cancelled; without, its next write
    to the client fails. Either way the upstream connection closes and nothing counts against the worker."""
    async with gateway_over(tokenizer, "endless_stream", handler_cancellation=handler_cancellation) as g:
        async with g.session.post(g.base + CHAT, json={**BODY, "stream": True}) as r:
            await r.content.readline()  # the stream has started; walk away
        await asyncio.wait_for(g.stubs[0].gone.wait(), timeout=30)  # the worker saw the disconnect
        await asyncio.wait_for(until(lambda: g.worker(0).in_flight == 0), timeout=30)
        assert g.worker(0).consecutive_failures == 0
        await asyncio.wait_for(until(lambda: bool(g.state.metrics.recent)), timeout=30)
        record = g.state.metrics.recent[-1]
        assert record.status == 499 and record.error == "the client went away"  # as nginx logs it
        assert g.state.metrics.summary()["errors"] == 0 and g.state.metrics.summary()["cancelled"] == 1


async def test_the_request_contract_is_parsed_once_at_the_gateway(tokenizer: Tokenizer) -> None:
    async with gateway_over(tokenizer, "ok") as g:
        async with g.session.post(g.base + CHAT, json={**BODY, "temperature": -1}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "temperature"
        assert not g.stubs[0].bodies  # rejected before any worker was bothered
        upstream_features = {"n": 2, "tools": [{"type": "function", "function": {"name": "f"}}]}
        async with g.session.post(g.base + CHAT, json={**BODY, **upstream_features}) as r:
            assert r.status == 200  # not the embedded engine's limits: the upstream decides
        sent = g.stubs[0].bodies[-1]
        assert sent["n"] == 2 and sent["tools"] == upstream_features["tools"]
        assert sent["model"] == "stub-model"  # defaulted to the served model
