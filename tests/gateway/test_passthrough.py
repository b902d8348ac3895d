"""``/v1/embeddings`` passed through to workers that serve it, a 404 where none does."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web

from cache.prompt.tokenizer import Tokenizer
from tests.gateway.stub_gateways import gateways_over
from tests.gateway.test_dispatch import StubWorker

EMBEDDING = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.5]}]}


@dataclass
class EmbeddingStub(StubWorker):
    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/v1/embeddings", self.embed)
        return app

    async def embed(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        return web.json_response(EMBEDDING)


async def test_embeddings_reach_a_worker_that_serves_them(tokenizer: Tokenizer) -> None:
    chat_only, embedder = StubWorker(), EmbeddingStub()
    body = {"model": "stub-model", "input": "hello"}
    async with (
        gateways_over(tokenizer, [chat_only, embedder]) as [(base, _)],
        aiohttp.ClientSession() as session,
    ):
        for _ in range(2):
            async with session.post(f"{base}/v1/embeddings", json=body) as answer:
                assert answer.status == 200
                assert await answer.json() == EMBEDDING
    assert embedder.bodies == [{"model": "stub-model", "input": "hello"}] * 2
    assert chat_only.bodies == []


async def test_embeddings_are_a_404_where_no_worker_serves_them(tokenizer: Tokenizer) -> None:
    async with (
        gateways_over(tokenizer, [StubWorker()]) as [(base, _)],
        aiohttp.ClientSession() as session,
        session.post(f"{base}/v1/embeddings", json={"input": "hello"}) as answer,
    ):
        assert answer.status == 404
        body = await answer.json()
    assert body["error"]["code"] == "unsupported_route"
