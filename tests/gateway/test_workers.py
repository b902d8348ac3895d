"""Worker capability probing, health and restarts against real HTTP servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cache.index.ops import StoredOp
from cache.prompt.tokenizer import Tokenizer
from cache.wire.hashing import HASH_SCHEME
from gateway.config import GatewayConfig
from gateway.event_sources import EventSource
from gateway.launcher import free_port
from gateway.state import STATE, GatewayState
from gateway.workers import Worker, WorkerPool
from tests.gateway.conftest import running_gateway

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


async def test_capacity_is_read_from_our_engine_and_from_sglang() -> None:
    ours = {"served_model_name": "m", "page_size": 16, "max_total_tokens": 4096, "max_total_host_tokens": 0}
    worker = await probed(HASH_SCHEME, ours)
    described = worker.describe()
    assert (described["device_capacity_blocks"], described["host_capacity_blocks"]) == (256, 0)
    hicache = {**SGLANG_INFO, "max_total_num_tokens": 3200, "hicache_ratio": 2.0, "hicache_size": 0}
    worker = await probed(None, hicache)  # SGLang's HiCache sized by ratio: twice the device pool
    assert (worker.device_capacity_tokens, worker.host_capacity_tokens) == (3200, 6400)
    assert worker.describe()["device_capacity_blocks"] == 200  # in the gateway's 16-token blocks
    assert (await probed(None, {"served_model_name": "m"})).describe()["device_capacity_blocks"] is None


# -- a stand-in of our engine, to stop, restart and fail at will ---------------------------------------
@dataclass
class EngineStandIn:
    """Our engine's probe and health answers (``instance_id`` names its process), nothing else."""

    instance_id: str
    healthy: bool = True
    capacity_tokens: int = 1024  # its device KV pool

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/get_load", self.load)
        app.router.add_get("/get_server_info", self.server_info)
        app.router.add_get("/v1/models", self.models)
        return app

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def load(self, _: web.Request) -> web.Response:
        return web.json_response([{"num_reqs": 0, "num_waiting_reqs": 0, "instance_id": self.instance_id}])

    async def server_info(self, _: web.Request) -> web.Response:
        return web.json_response(
            {
                "served_model_name": "m",
                "page_size": 16,
                "kv_block_hash": HASH_SCHEME,
                "max_total_tokens": self.capacity_tokens,
                "max_total_host_tokens": 0,
                "instance_id": self.instance_id,
            }
        )

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})


class Served:
    """An app on a fixed loopback port that a test stops and starts again (a worker restarting)."""

    def __init__(self, port: int) -> None:
        self.port, self.runner = port, None

    async def start(self, app: web.Application) -> None:
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(3000):  # a bound on waiting for the gateway's health checks, not a threshold
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


def blocks_of(state: GatewayState, worker_id: str) -> tuple[int, int]:
    return state.store.index.stats().per_worker.get(worker_id, (0, 0))[:2]  # (device, host)


@contextlib.asynccontextmanager
async def gateway_for(tokenizer: Tokenizer) -> AsyncIterator[tuple[GatewayState, Served]]:
    """A gateway checking health every 50 ms in front of one worker port (a stand-in, started or not)."""
    served = Served(free_port())
    config = GatewayConfig(workers=(f"http://127.0.0.1:{served.port}",), health_interval_s=0.05)
    try:
        async with running_gateway(config, tokenizer) as (_, app):
            yield app[STATE], served
    finally:
        await served.stop()


async def test_a_restarted_worker_loses_its_index_entries_before_it_takes_requests_again(
    tokenizer: Tokenizer,
) -> None:
    async with gateway_for(tokenizer) as (state, served):
        await served.start(EngineStandIn("first").app())
        url = f"http://127.0.0.1:{served.port}"
        worker = state.pool.workers[url]
        await until(lambda: worker.available and worker.instance_id == "first", "the worker attached")
        await state.store.append(StoredOp(url, None, [11, 12, 13]))
        assert blocks_of(state, url) == (3, 0)

        await served.stop()  # it goes away and a new process comes back on the same URL
        await until(lambda: not worker.healthy, "the worker seen down")
        assert blocks_of(state, url) == (3, 0)  # down is not gone: a blip keeps what it holds
        await served.start(EngineStandIn("second").app())
        await until(lambda: worker.available, "the worker back")
        assert blocks_of(state, url) == (0, 0)  # purged before it could take a request
        assert worker.instance_id == "second"

        # Restarted between two health checks (never seen down): its load names the new process.
        await state.store.append(StoredOp(url, None, [21, 22]))
        await served.stop()
        await served.start(EngineStandIn("third").app())
        await until(lambda: blocks_of(state, url) == (0, 0), "the entries purged")
        assert worker.instance_id == "third"

        # The same process again: nothing is purged.
        await state.store.append(StoredOp(url, None, [31]))
        await asyncio.sleep(0.5)  # ten health checks
        assert blocks_of(state, url) == (1, 0)


async def test_a_worker_unreachable_at_start_says_so_and_why_then_is_probed_when_it_answers(
    tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.workers")
    async with gateway_for(tokenizer) as (state, served):
        url = f"http://127.0.0.1:{served.port}"
        worker = state.pool.workers[url]
        assert worker.describe()["kind"] == "unreachable" and not worker.available
        [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert "does not answer (cannot connect: Connection refused)" in warning.getMessage()
        await asyncio.sleep(0.3)  # several failed health checks: no more lines, the state did not change
        assert [r for r in caplog.records if r.levelno == logging.WARNING] == [warning]

        await served.start(EngineStandIn("first").app())
        await until(lambda: worker.available, "the worker attached")
        assert worker.describe()["kind"] == "prefixgate"  # probed before it took requests
        assert worker.describe()["device_capacity_blocks"] == 64  # 1,024 tokens in 16-token blocks


async def test_health_check_failures_are_logged_with_their_reason_once_per_change(
    tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    standin = EngineStandIn("first")
    async with gateway_for(tokenizer) as (state, served):
        await served.start(standin.app())
        worker = state.pool.workers[f"http://127.0.0.1:{served.port}"]
        await until(lambda: worker.available, "the worker attached")
        caplog.set_level(logging.INFO, logger="gateway.workers")
        caplog.clear()
        standin.healthy = False
        await until(lambda: not worker.healthy, "the worker seen down")
        await asyncio.sleep(0.3)  # several more failed checks
        standin.healthy = True
        await until(lambda: worker.healthy, "the worker back")
        await asyncio.sleep(0.3)
    lines = [r.getMessage() for r in caplog.records if "health" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "failed its health check (/health answered HTTP 503)" in lines[0]
    assert "passes its health check" in lines[1]
