"""``--worker-dns``: a name's addresses become workers; addresses that vanish are drained and forgotten."""

from __future__ import annotations

import socket

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cache.index.ops import StoredOp
from cache.prompt.tokenizer import Tokenizer
from gateway.config import GatewayConfig
from gateway.discovery import DnsWorkers, parse_name, resolve_addresses, worker_url
from gateway.state import STATE
from tests.gateway.conftest import running_gateway


def stub_worker() -> web.Application:
    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    return app


def test_names_and_urls() -> None:
    assert parse_name("engine.default.svc:30000") == ("engine.default.svc", 30000)
    assert parse_name("[fd00::1]:80") == ("fd00::1", 80)
    for bad in ("engine", "engine:", "engine:x", ":80", "engine:70000"):
        with pytest.raises(ValueError, match="--worker-dns"):
            parse_name(bad)
    assert worker_url("10.0.0.7", 30000) == "http://10.0.0.7:30000"
    assert worker_url("fd00::7", 30000) == "http://[fd00::7]:30000"


async def test_localhost_resolves_to_loopback() -> None:
    assert "127.0.0.1" in await resolve_addresses("localhost", 80)
    with pytest.raises(socket.gaierror):
        await resolve_addresses("no-such-worker.invalid", 80)


async def test_appearing_and_vanishing_addresses_attach_and_detach_and_a_failure_keeps_them() -> None:
    answers = [{"10.0.0.1", "10.0.0.2"}, {"10.0.0.2", "10.0.0.3"}, OSError("SERVFAIL"), set()]
    attached: list[str] = []
    detached: list[str] = []

    async def resolve(host: str, port: int) -> set[str]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def attach(url: str) -> None:
        attached.append(url)

    async def detach(url: str) -> None:
        detached.append(url)

    static = "http://10.0.0.2:30000"  # also given as --worker: never DNS's to attach or detach
    dns = DnsWorkers(("engine:30000",), attach, detach, resolve, static=[static])
    await dns.sync()
    assert attached == ["http://10.0.0.1:30000"] and not detached
    await dns.sync()
    assert attached[1:] == ["http://10.0.0.3:30000"] and detached == ["http://10.0.0.1:30000"]
    await dns.sync()  # the resolution failed: nothing changes
    assert dns.urls == {"http://10.0.0.3:30000"} and len(detached) == 1
    await dns.sync()
    assert detached[1:] == ["http://10.0.0.3:30000"] and dns.urls == set()


async def test_a_gateway_finds_workers_by_name_and_drops_a_vanished_ones_entries(
    tokenizer: Tokenizer,
) -> None:
    async with TestServer(stub_worker(), host="127.0.0.1") as server:
        url = f"http://127.0.0.1:{server.port}"
        config = GatewayConfig(worker_dns=(f"localhost:{server.port}",), health_interval_s=0.5)
        async with running_gateway(config, tokenizer) as (_, app):
            state = app[STATE]
            worker = state.pool.workers[url]  # "localhost" named it; attached and probed at startup
            assert worker.healthy and worker.model_id == "m"
            await state.store.append(StoredOp(url, None, [1, 2, 3]))
            assert url in state.store.match([1, 2, 3])

            async def vanished(host: str, port: int) -> set[str]:
                return set()

            state.dns_workers.resolve = vanished
            await state.dns_workers.sync()
            assert url not in state.pool.workers and state.store.match([1, 2, 3]) == {}
