"""Streams end cleanly whatever happens: client disconnect, /abort_request, an engine failure."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from tests.engine.server.conftest import EngineServer

pytestmark = pytest.mark.slow  # every test here talks to a worker serving the real model

LONG = {"max_tokens": 400, "ignore_eos": True, "temperature": 0}


async def events(resp: aiohttp.ClientResponse):
    async for line in resp.content:
        line = line.strip()
        if line.startswith(b"data: "):
            data = line[len(b"data: ") :]
            yield None if data == b"[DONE]" else json.loads(data)


def assert_pages_released(server: EngineServer) -> None:
    """Idle engine: no request holds a page; every used page belongs to the prefix cache, unlocked."""
    server.wait_idle()
    engine = server.engine
    assert engine.scheduler.running == [] and len(engine.scheduler.waiting) == 0
    assert engine.pool.num_used == engine.cache.num_pages == engine.cache.evictable_pages
    assert engine.scheduler.pages_held_by_requests == 0


def abort_count(server: EngineServer, endpoint: str) -> float:
    value = server.state.metrics.registry.get_sample_value(
        "prefixgate_engine_requests_total", {"endpoint": endpoint, "finish_reason": "abort"}
    )
    return value or 0.0


async def test_client_disconnect_mid_stream_frees_pages(engine_server: EngineServer) -> None:
    before = abort_count(engine_server, "chat")
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True, **LONG}
    url = engine_server.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
        assert resp.status == 200
        received = 0
        async for _ in events(resp):
            received += 1
            if received == 3:
                break
        assert engine_server.engine.pool.num_used > 0
    # leaving the block closed the connection mid-stream
    assert_pages_released(engine_server)
    assert abort_count(engine_server, "chat") == before + 1


async def test_client_disconnect_while_waiting_for_a_whole_response(engine_server: EngineServer) -> None:
    before = abort_count(engine_server, "completions")
    body = {"prompt": "Write an essay about rivers.", **LONG}
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.post(
                engine_server.url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=1.0)
            )
    assert_pages_released(engine_server)
    assert abort_count(engine_server, "completions") == before + 1


async def test_abort_request_ends_a_generate_stream(engine_server: EngineServer) -> None:
    body = {
        "text": "Tell me about the sea.",
        "rid": "abort-me",
        "stream": True,
        "sampling_params": {"max_new_tokens": 400, "ignore_eos": True},
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(engine_server.url + "/generate", json=body) as resp,
    ):
        seen: list[Any] = []
        async for event in events(resp):
            seen.append(event)
            if len(seen) == 2:
                async with session.post(engine_server.url + "/abort_request", json={"rid": "abort-me"}) as r:
                    assert r.status == 200
    assert seen[-1] is None  # [DONE]
    last = seen[-2]
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert last["meta_info"]["id"] == "abort-me" and last["meta_info"]["completion_tokens"] < 400
    assert_pages_released(engine_server)


@pytest.fixture
def failing_step(engine_server: EngineServer, monkeypatch: pytest.MonkeyPatch):
    """Make the model runner raise from its ``n``-th call on (the engine thread sees it as a failure)."""
    engine_server.wait_idle()
    runner = engine_server.engine.runner
    real_run = runner.run

    def arm(n: int) -> None:
        calls = 0

        def run(batch):
            nonlocal calls
            calls += 1
            if calls >= n:
                raise RuntimeError("injected device failure")
            return real_run(batch)

        monkeypatch.setattr(runner, "run", run)

    yield arm
    monkeypatch.undo()


async def test_engine_error_mid_stream_ends_with_error_event(
    engine_server: EngineServer, failing_step
) -> None:
    failing_step(3)  # prefill and one decode succeed, then the engine fails
    body = {"prompt": "Count: 1, 2,", "stream": True, **LONG}
    async with (
        aiohttp.ClientSession() as session,
        session.post(engine_server.url + "/v1/completions", json=body) as resp,
    ):
        assert resp.status == 200
        seen = [event async for event in events(resp)]
    assert seen[-1] is None, "the stream must end with [DONE]"
    assert seen[-2]["error"]["type"] == "server_error" and "injected" in seen[-2]["error"]["message"]
    assert any("choices" in e for e in seen[:-2])  # some text came before the failure
    assert_pages_released(engine_server)


async def test_engine_error_before_first_token_is_a_500(engine_server: EngineServer, failing_step) -> None:
    failing_step(1)
    async with (
        aiohttp.ClientSession() as session,
        session.post(engine_server.url + "/generate", json={"text": "Hi", "stream": True}) as resp,
    ):
        assert resp.status == 500
        assert (await resp.json())["error"]["code"] == "engine_error"
    assert_pages_released(engine_server)
