"""Worker capability probing against real HTTP servers on loopback."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from cache.wire.hashing import HASH_SCHEME
from gateway.workers import WorkerPool


def info_app(kv_block_hash: str) -> web.Application:
    """A native worker's info endpoints, as an engine of some hash scheme would answer them."""

    async def server_info(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "served_model_name": "m",
                "page_size": 16,
                "kv_events_endpoint": "tcp://127.0.0.1:1",
                "kv_block_hash": kv_block_hash,
            }
        )

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    app = web.Application()
    app.router.add_get("/get_server_info", server_info)
    app.router.add_get("/v1/models", models)
    return app


async def probe(kv_block_hash: str) -> tuple[str, str | None]:
    async with (
        TestServer(info_app(kv_block_hash), host="127.0.0.1") as server,
        aiohttp.ClientSession() as session,
    ):
        worker = await WorkerPool(session, 3, 1.0).add(str(server.make_url("")))
    return worker.kind, worker.kv_events_endpoint


async def test_events_of_our_hash_scheme_are_ingested() -> None:
    assert await probe(HASH_SCHEME) == ("prefixgate", "tcp://127.0.0.1:1")


async def test_events_of_another_hash_scheme_are_ignored() -> None:
    # An engine of format v1 names blocks differently: its events could never match our prompts' hashes,
    # so the gateway falls back to approximate inserts of what it routes.
    assert await probe("prefixgate/kv/v1 xxh3") == ("prefixgate", None)
    assert await probe("sglang-whatever") == ("sglang", None)
