"""``/v1/embeddings`` passed through to workers that serve it, a 404 where none does."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web

from cache.prompt.tokenizer import Tokenizer
from gateway.state import STATE
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


@dataclass
class TokenizerStub(StubWorker):
    """Serves vLLM's tokenizer routes for ``model``; SGLang's paths answer 405 (as a server whose route
    takes another method does)."""

    model: str = "stub-model"

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/v1/tokenize", self.tokenize)
        app.router.add_post("/v1/detokenize", self.detokenize)
        app.router.add_get("/tokenize", self.tokenize)
        return app

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        return web.json_response({"count": 2, "max_model_len": 64, "tokens": [1, 2], "token_strs": None})

    async def detokenize(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        return web.json_response({"prompt": self.model})


async def test_tokenize_routes_reach_workers_of_the_named_model(tokenizer: Tokenizer) -> None:
    chat_only, other, ours = StubWorker(), TokenizerStub(model="other-model"), TokenizerStub()
    async with (
        gateways_over(tokenizer, [chat_only, other, ours]) as [(base, app)],
        aiohttp.ClientSession() as session,
    ):
        assert [w.model_id for w in app[STATE].pool] == ["stub-model", "other-model", "stub-model"]
        body = {"model": "stub-model", "prompt": "hi", "kv_pin": {"ttl_s": 60}}
        async with session.post(f"{base}/v1/tokenize", json=body) as answer:
            assert answer.status == 200
            assert (await answer.json())["tokens"] == [1, 2]
        async with session.post(
            f"{base}/v1/detokenize", json={"model": "stub-model", "tokens": [1]}
        ) as answer:
            assert await answer.json() == {"prompt": "stub-model"}
        for path in ("/tokenize", "/detokenize"):  # nobody serves them (404s and a 405)
            async with session.post(f"{base}{path}", json={"prompt": "hi"}) as answer:
                assert answer.status == 404
                assert (await answer.json())["error"]["code"] == "unsupported_route"
    assert ours.bodies[0] == {"model": "stub-model", "prompt": "hi"}  # no gateway-only field passes
    assert other.bodies == [] and chat_only.bodies == []
