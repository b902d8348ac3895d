"""A request's prefix follows it to its worker from the moment it is sent: a worker answers a stream's
headers only after its prefill (as the embedded engine does), and a request with the same prefix that
arrives meanwhile must go to the same worker rather than prefill the prefix again elsewhere."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from cache.api.sse import send_done, send_event
from cache.prompt.tokenizer import Tokenizer
from gateway.config import GatewayConfig, RoutingConfig
from tests.gateway.conftest import running_gateway
from tests.gateway.test_dispatch import StubWorker

CHAT = "/v1/chat/completions"
SYSTEM = " ".join(f"Instruction {i}: be brief and exact." for i in range(80))


@dataclass
class SlowPrefill(StubWorker):
    """Streams one chunk, sending its headers only once ``release`` is set (its "prefill" is done)."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    served: list[str] = field(default_factory=list)

    async def complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.served.append(body["messages"][-1]["content"])
        await self.release.wait()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await send_event(response, {"choices": [{"index": 0, "delta": {"content": "ok"}}]})
        await send_done(response)
        return response


async def ask(url: str, question: str) -> int:
    body: dict[str, Any] = {
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "max_tokens": 4,
        "stream": True,
    }
    async with aiohttp.ClientSession() as s, s.post(url + CHAT, json=body) as r:
        await r.read()
        return r.status


def test_a_request_with_the_same_prefix_follows_one_still_in_prefill(tokenizer: Tokenizer) -> None:
    async def go() -> None:
        stubs = [SlowPrefill(), SlowPrefill()]
        servers = [TestServer(s.app()) for s in stubs]
        for server in servers:
            await server.start_server()
        urls = tuple(str(server.make_url("")).rstrip("/") for server in servers)
        config = GatewayConfig(workers=urls, routing=RoutingConfig(), health_interval_s=0.5)
        try:
            async with running_gateway(config, tokenizer) as (url, _):
                first = asyncio.ensure_future(ask(url, "first?"))
                while not any(s.served for s in stubs):
                    await asyncio.sleep(0.01)
                second = asyncio.ensure_future(ask(url, "second?"))
                while sum(len(s.served) for s in stubs) < 2:
                    await asyncio.sleep(0.01)
                for stub in stubs:
                    stub.release.set()
                assert await first == 200 and await second == 200
        finally:
            for server in servers:
                await server.close()
        assert sorted(len(s.served) for s in stubs) == [0, 2]  # both on the worker prefilling the prefix

    asyncio.run(go())
