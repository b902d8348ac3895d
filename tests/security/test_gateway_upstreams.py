"""Attacks on the gateway through its upstreams and its clients: poison requests, misbehaving workers,
redirects, clients that go away, hostile headers and bodies. Stub workers on loopback; no model."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cache.prompt.tokenizer import Tokenizer
from gateway.config import Tenant
from tests.gateway.test_dispatch import read_events, until
from tests.security.gateway_support import (
    BODY,
    CHAT,
    POISON_MAX_TOKENS,
    HostileWorker,
    gateway_over,
    shared_tokenizer,  # noqa: F401  (the ``tokenizer`` fixture)
)


async def test_poison_requests_never_open_the_circuit_for_every_tenant(tokenizer: Tokenizer) -> None:
    """Three requests whose parameters make every worker fail (a 5xx each) must not take the workers
    out: the next tenant's request is served, not a 503."""
    keys = {"key-a": Tenant("attacker", "a"), "key-b": Tenant("victim", "b")}
    async with gateway_over(tokenizer, HostileWorker("poison"), HostileWorker("poison"), api_keys=keys) as g:
        poison = {**BODY, "max_tokens": POISON_MAX_TOKENS}
        for _ in range(3):
            async with g.session.post(
                g.base + CHAT, json=poison, headers={"Authorization": "Bearer key-a"}
            ) as r:
                assert r.status == 502
        assert all(w.available and w.consecutive_failures == 0 for w in g.state.pool)
        async with g.session.post(g.base + CHAT, json=BODY, headers={"Authorization": "Bearer key-b"}) as r:
            assert r.status == 200


async def test_a_5xx_is_charged_to_the_worker_once_another_serves_the_request(tokenizer: Tokenizer) -> None:
    async with gateway_over(tokenizer, HostileWorker("secret_500"), HostileWorker("ok")) as g:
        async with g.session.post(g.base + CHAT, json=BODY) as r:
            assert r.status == 200
        assert [w.consecutive_failures for w in g.state.pool] == [1, 0]


async def test_an_abandoned_non_streamed_request_is_recorded_as_499(tokenizer: Tokenizer) -> None:
    release = asyncio.Event()

    class Slow(HostileWorker):
        async def complete(self, request: web.Request) -> web.StreamResponse:
            self.bodies.append(await request.json())
            await release.wait()
            return web.json_response({})

    async with gateway_over(tokenizer, Slow()) as g:
        task = asyncio.create_task(g.session.post(g.base + CHAT, json=BODY))
        await until(lambda: bool(g.stubs[0].bodies))
        task.cancel()  # the client goes away while the worker works
        await asyncio.wait_for(until(lambda: bool(g.state.metrics.recent)), timeout=30)
        release.set()
        assert g.state.metrics.recent[-1].status == 499
        worker = next(iter(g.state.pool))
        assert worker.consecutive_failures == 0
        assert (
            g.state.metrics.registry.get_sample_value(
                "prefixgate_requests_total", {"worker": worker.worker_id, "status": "499"}
            )
            == 1
        )


@pytest.mark.parametrize(
    ("mode", "status"),
    [("secret_500", 502), ("html_200", 502), ("html_400", 400), ("bad_json_200", 502), ("huge_body", 502)],
)
async def test_a_misbehaving_worker_gives_the_client_a_clean_error(
    tokenizer: Tokenizer, mode: str, status: int
) -> None:
    async with gateway_over(tokenizer, HostileWorker(mode), max_upstream_body_bytes=2**20) as g:
        async with g.session.post(g.base + CHAT, json=BODY) as r:
            assert r.status == status
            assert r.content_type == "application/json"
            raw = await r.read()
        error = orjson.loads(raw)["error"]
        assert isinstance(error["message"], str) and error["type"]
        assert b"SECRET" not in raw and b"/srv/" not in raw and b"<html>" not in raw


@pytest.mark.parametrize("mode", ["long_sse_line", "bad_sse_json"])
async def test_a_garbled_stream_ends_with_an_error_event(tokenizer: Tokenizer, mode: str) -> None:
    async with gateway_over(tokenizer, HostileWorker(mode)) as g:
        async with g.session.post(g.base + CHAT, json={**BODY, "stream": True}) as r:
            assert r.status == 200
            events = await read_events(r)
        assert events[0]["choices"][0]["delta"]["content"] == "Hel"
        assert events[-2]["error"]["type"] == "server_error" and events[-1] == "[DONE]"
        assert g.state.metrics.recent[-1].status == 502


async def test_non_integer_usage_reads_as_absent(tokenizer: Tokenizer) -> None:
    async with gateway_over(tokenizer, HostileWorker("bad_usage")) as g:
        async with g.session.post(g.base + CHAT, json=BODY) as r:
            assert r.status == 200
        record = g.state.metrics.recent[-1]
        assert record.cached_tokens is None and record.completion_tokens == 0
        async with g.session.get(g.base + "/stats") as r:
            assert r.status == 200


async def test_a_redirect_is_an_upstream_error_and_never_followed(tokenizer: Tokenizer) -> None:
    """A worker's 307 would make a client re-POST the body (the tenant's salt included) elsewhere."""
    sink = HostileWorker("ok")
    async with TestServer(sink.app(), host="127.0.0.1") as sink_server:
        hostile = HostileWorker("ok", redirect_to=str(sink_server.make_url("")).rstrip("/"))
        async with gateway_over(tokenizer, hostile) as g:
            hostile.mode = "redirect"  # attached while it behaved
            async with g.session.post(g.base + CHAT, json=BODY) as r:
                assert r.status == 502
            await g.state.pool.probe(next(iter(g.state.pool)))  # probes do not follow either
        assert sink.bodies == [] and sink.probes == []
        assert not next(iter(g.state.pool)).healthy


async def _raw_request(base: str, head: bytes, body: bytes = b"", status_only: bool = False) -> bytes:
    """What the gateway sends back on a raw connection: all of it, or its status line."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head + body)
    await writer.drain()
    answer = await (reader.readline() if status_only else reader.read())
    writer.close()
    return answer


async def test_a_non_ascii_authorization_header_is_a_401(tokenizer: Tokenizer) -> None:
    keys = {"key-a": Tenant("a", "a")}
    async with gateway_over(tokenizer, HostileWorker("ok"), api_keys=keys) as g:
        body = orjson.dumps(BODY)
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer \xff\xfe\xc3\xa9key\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        answer = await _raw_request(g.base, head, body, status_only=True)
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        assert g.stubs[0].bodies == []


async def test_deeply_nested_json_is_a_400(tokenizer: Tokenizer) -> None:
    async with gateway_over(tokenizer, HostileWorker("ok")) as g:
        nested = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        async with g.session.post(
            g.base + CHAT, data=nested, headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 400
            assert (await r.json())["error"]["type"] == "invalid_request_error"


async def test_slow_clients_are_cut_off(tokenizer: Tokenizer) -> None:
    """Slowloris: headers that never end get the connection closed; a body that never ends, a 408."""
    async with gateway_over(tokenizer, HostileWorker("ok"), client_timeout_s=0.2) as g:
        partial_head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: "
        assert await asyncio.wait_for(_raw_request(g.base, partial_head), timeout=60) == b""
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        answer = await asyncio.wait_for(_raw_request(g.base, head, b'{"mess', status_only=True), timeout=60)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


async def test_a_large_answer_under_the_cap_is_relayed_whole(tokenizer: Tokenizer) -> None:
    """The cap reads until the end of the body, not whatever arrived first."""
    async with gateway_over(tokenizer, HostileWorker("huge_body", huge_bytes=3 * 2**20)) as g:
        r = await g.session.post(g.base + CHAT, json=BODY)
        assert r.status == 200
        assert len(orjson.loads(await r.read())["x"]) == 3 * 2**20
