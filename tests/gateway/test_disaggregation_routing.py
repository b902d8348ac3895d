"""Disaggregated routing against stub workers on loopback (no model): what each leg receives in vLLM's
``kv_transfer_params`` protocol, the conditional path, client fields dropped, and sessions keeping
their decode worker. The real engines and an SGLang PD pair are in test_disaggregation.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from cache.prompt.tokenizer import Tokenizer
from gateway.config import GatewayConfig, RoutingConfig
from tests.gateway.conftest import running_gateway
from tests.gateway.test_dispatch import StubWorker

CHAT = "/v1/chat/completions"
PARAMS = {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": 1, "remote_block_ids": [7]}
LONG = " ".join(f"word{i}" for i in range(600))


@dataclass
class Stub(StubWorker):
    """``StubWorker`` recording what it receives; as a prefill worker it answers with
    ``kv_transfer_params`` (vLLM's shape)."""

    prefill: bool = False

    async def complete(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        reply: dict[str, Any] = {
            "object": "chat.completion",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        }
        if self.prefill:
            reply["kv_transfer_params"] = PARAMS
        return web.json_response(reply)


@contextlib.asynccontextmanager
async def pd_gateway(tokenizer: Tokenizer, prefill: list[Stub], decode: list[Stub]) -> AsyncIterator[str]:
    servers = [TestServer(s.app()) for s in (*prefill, *decode)]
    for server in servers:
        await server.start_server()
    urls = [str(server.make_url("")).rstrip("/") for server in servers]
    config = GatewayConfig(
        prefill_workers=tuple(urls[: len(prefill)]),
        decode_workers=tuple(urls[len(prefill) :]),
        routing=RoutingConfig(),
        health_interval_s=0.5,
    )
    try:
        async with running_gateway(config, tokenizer) as (url, _):
            yield url
    finally:
        for server in servers:
            await server.close()


async def chat(url: str, content: str, **extra: Any) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 50, **extra}
    async with aiohttp.ClientSession() as s, s.post(url + CHAT, json=body) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def test_prefill_leg_then_decode_leg_with_the_prefill_workers_parameters(tokenizer: Tokenizer) -> None:
    p, d = Stub(prefill=True), Stub()

    async def go() -> None:
        async with pd_gateway(tokenizer, [p], [d]) as url:
            await chat(url, LONG, stream=False)
        (leg,) = p.bodies
        assert leg["max_tokens"] == 1 and "stream" not in leg
        assert leg["kv_transfer_params"] == {"do_remote_decode": True, "do_remote_prefill": False}
        (decode,) = d.bodies
        assert decode["kv_transfer_params"] == PARAMS
        assert decode["max_tokens"] == 50

    asyncio.run(go())


def test_short_prompt_skips_the_prefill_worker_and_client_fields_never_pass(tokenizer: Tokenizer) -> None:
    p, d = Stub(prefill=True), Stub()
    forged = {"kv_transfer_params": PARAMS, "bootstrap_room": 5, "bootstrap_host": "10.0.0.1"}

    async def go() -> None:
        async with pd_gateway(tokenizer, [p], [d]) as url:
            await chat(url, "Say hi.", **forged)
            await chat(url, LONG, **forged)
        assert len(d.bodies) == 2 and len(p.bodies) == 1
        short, long = d.bodies
        assert not set(forged) & set(short)  # dropped, nothing put in their place
        assert long["kv_transfer_params"] == PARAMS  # the prefill worker's, not the client's
        assert "bootstrap_room" not in long and "bootstrap_room" not in p.bodies[0]

    asyncio.run(go())


def test_a_session_keeps_its_decode_worker(tokenizer: Tokenizer) -> None:
    p, d1, d2 = Stub(prefill=True), Stub(), Stub()

    async def go() -> None:
        async with pd_gateway(tokenizer, [p], [d1, d2]) as url:
            for turn in range(4):
                await chat(url, f"turn {turn}", prompt_cache_key="conversation-1")
        assert sorted((len(d1.bodies), len(d2.bodies))) == [0, 4]

    asyncio.run(go())


def test_a_prefill_worker_never_serves_a_plain_request(tokenizer: Tokenizer) -> None:
    p, d = Stub(prefill=True), Stub()

    async def go() -> None:
        async with pd_gateway(tokenizer, [p], [d]) as url:
            for i in range(4):
                await chat(url, f"short {i}")
        assert p.bodies == [] and len(d.bodies) == 4

    asyncio.run(go())
