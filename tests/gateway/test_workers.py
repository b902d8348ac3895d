"""Worker capability probing against real HTTP servers on loopback."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from cache.wire.hashing import HASH_SCHEME
from gateway.event_sources import EventSource
from gateway.workers import Worker, WorkerPool

SGLANG_INFO = {  # the fields of SGLang 0.5.2's /get_server_info the gateway reads (it sends ~200)
    "served_model_name": "m",
    "page_size": 1,
    "dp_size": 2,
    "enable_dp_attention": True,
    "kv_events_config": '{"publisher": "zmq", "endpoint": "tcp://*:5557", '
    '"replay_endpoint": "tcp://*:5600", "topic": "kv"}',
}


def info_app(kv_block_hash: str | None, info: dict | None = None) -> web.Application:
    """A native worker's info endpoints, as an engine of some hash scheme would answer them."""

    async def server_info(_: web.Request) -> web.Response:
        body = info or {
            "served_model_name": "m",
            "page_size": 16,
            "kv_events_endpoint": "tcp://127.0.0.1:1",
        }
        if kv_block_hash is not None:
            body = {**body, "kv_block_hash": kv_block_hash}
        return web.json_response(body)

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    app = web.Application()
    app.router.add_get("/get_server_info", server_info)
    app.router.add_get("/v1/models", models)
    return app


async def probed(
    kv_block_hash: str | None, info: dict | None = None, configured: EventSource | None = None
) -> Worker:
    """The worker as probed; ``configured``: its ``--worker-events`` source."""
    async with (
        TestServer(info_app(kv_block_hash, info), host="127.0.0.1", port=0) as server,
        aiohttp.ClientSession() as session,
    ):
        url = str(server.make_url("")).rstrip("/")
        sources = {url: configured} if configured else {}
        return await WorkerPool(session, 3, 1.0, sources).add(url)


async def probe(kv_block_hash: str) -> tuple[str, str | None]:
    worker = await probed(kv_block_hash)
    return worker.kind, worker.kv_events_endpoint


async def test_events_of_our_hash_scheme_are_ingested() -> None:
    assert await probe(HASH_SCHEME) == ("prefixgate", "tcp://127.0.0.1:1")


async def test_events_of_another_hash_scheme_are_renamed_not_ignored() -> None:
    # An engine of another scheme names blocks differently: its events are renamed from their token ids
    # (cache.index.rekey), so they are subscribed to all the same.
    assert await probe("prefixgate/kv/v1 xxh3") == ("prefixgate", "tcp://127.0.0.1:1")
    worker = await probed("sglang-whatever")
    assert (worker.kind, worker.kv_events_endpoint, worker.own_hashes) == (
        "sglang",
        "tcp://127.0.0.1:1",
        False,
    )


async def test_sglang_server_info_reveals_its_event_streams_on_the_worker_host() -> None:
    worker = await probed(None, SGLANG_INFO)
    # tcp://*: SGLang binds, on its own host: the gateway connects there; two DP-attention ranks
    assert worker.kv_events == EventSource(
        "tcp://127.0.0.1:5557", bind=False, replay_endpoint="tcp://127.0.0.1:5600", topic="kv"
    )
    assert worker.dp_ranks == 2 and worker.kv_events.for_rank(1).endpoint == "tcp://127.0.0.1:5558"
    assert worker.kv_events.for_rank(1).replay_endpoint == "tcp://127.0.0.1:5601"
    # SGLang pages of 1 token: the gateway indexes it in 16-token blocks
    assert (worker.engine_page_size, worker.page_size, worker.own_hashes) == (1, 16, False)


async def test_a_non_wildcard_sglang_endpoint_is_bound_by_the_gateway() -> None:
    config = '{"publisher": "zmq", "endpoint": "tcp://127.0.0.1:7001"}'
    info = {**SGLANG_INFO, "page_size": 24, "enable_dp_attention": False, "kv_events_config": config}
    worker = await probed(None, info)
    assert worker.kv_events == EventSource("tcp://127.0.0.1:7001", bind=True)  # SGLang connects to it
    assert (worker.dp_ranks, worker.page_size) == (1, 48)  # one stream without DP attention; lcm(16, 24)
    assert (await probed(None, {**SGLANG_INFO, "kv_events_config": "not json"})).kv_events is None


async def test_a_wildcard_endpoint_of_our_engine_means_its_own_host() -> None:
    info = {"served_model_name": "m", "page_size": 16, "kv_events_endpoint": "tcp://0.0.0.0:9"}
    worker = await probed(HASH_SCHEME, info)
    assert (worker.kv_events_endpoint, worker.own_hashes, worker.page_size) == ("tcp://127.0.0.1:9", True, 16)


async def test_configured_events_win_over_discovery() -> None:
    worker = await probed(None, SGLANG_INFO, EventSource("tcp://10.0.0.9:5557"))
    assert worker.kv_events == EventSource("tcp://10.0.0.9:5557") and worker.dp_ranks == 2
