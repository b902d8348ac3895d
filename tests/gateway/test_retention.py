"""Retention at the gateway, against stub workers: ``prompt_cache_retention`` (chat, Responses) and
``cache_control`` ttls (Messages) become a ``kv_pin`` for workers of our engine only, bounded by
``--max-retention-s``; a client's own ``kv_pin`` never reaches a worker."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from cache.prompt.chat import chat_prompt_ids
from cache.prompt.tokenizer import Tokenizer
from cache.wire.hashing import HASH_SCHEME
from gateway.retention import breakpoint_pins, common_prefix, openai_pins
from gateway.state import STATE
from tests.gateway.stub_gateways import gateways_over
from tests.gateway.test_dispatch import BODY, StubWorker


@dataclass
class EngineStub(StubWorker):
    """Answers the probe as our engine does (``kind`` "prefixgate")."""

    def app(self) -> web.Application:
        app = super().app()
        info = {"kv_block_hash": HASH_SCHEME, "served_model_name": "stub-model", "page_size": 16}
        for path, answer in (("/get_server_info", info), ("/health", {}), ("/get_load", [{"num_reqs": 0}])):
            app.router.add_get(path, _answering(answer))
        return app


def _answering(answer: object) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(_: web.Request) -> web.Response:
        return web.json_response(answer)

    return handle


async def post(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, dict]:
    async with session.post(url, json=body) as answer:
        return answer.status, await answer.json()


def test_openai_retention_maps_to_a_bounded_ttl() -> None:
    assert openai_pins({}, 86400) == []
    assert openai_pins({"prompt_cache_retention": "24h"}, 86400) == [{"ttl_s": 86400}]
    assert openai_pins({"prompt_cache_retention": "in_memory"}, 86400) == [{"ttl_s": 600}]
    assert openai_pins({"prompt_cache_retention": "24h"}, 3600) == [{"ttl_s": 3600}]
    assert openai_pins({"prompt_cache_retention": "24h"}, 0) == []


def test_breakpoints_keep_only_pins_no_longer_pin_covers() -> None:
    # 1h on the system prompt (40 tokens), 5m on the whole conversation (90): both are needed
    assert breakpoint_pins([(40, 3600), (90, 300)], 86400) == [
        {"tokens": 40, "ttl_s": 3600},
        {"tokens": 90, "ttl_s": 300},
    ]
    # a longer prefix held as long covers the shorter one; a cut the template could not render pins nothing
    assert breakpoint_pins([(40, 300), (90, 300), (0, 3600)], 86400) == [{"tokens": 90, "ttl_s": 300}]
    # bounded by --max-retention-s, after which the 1h pin of the shorter prefix adds nothing
    assert breakpoint_pins([(40, 3600), (90, 300)], 300) == [{"tokens": 90, "ttl_s": 300}]
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2


async def test_chat_retention_pins_on_our_engine_only(tokenizer: Tokenizer) -> None:
    ours, theirs = EngineStub(), StubWorker()
    async with (
        gateways_over(tokenizer, [ours, theirs]) as [(base, _)],
        aiohttp.ClientSession() as session,
    ):
        body = {**BODY, "prompt_cache_retention": "24h", "kv_pin": {"ttl_s": 1e6}}
        for _ in range(2):  # round robin: one request each
            status, _ = await post(session, f"{base}/v1/chat/completions", body)
            assert status == 200
    [to_ours], [to_theirs] = ours.bodies, theirs.bodies
    assert to_ours["kv_pin"] == [{"ttl_s": 86400}]  # the gateway's, not the client's
    assert "kv_pin" not in to_theirs and to_theirs["prompt_cache_retention"] == "24h"


async def test_responses_retention_is_bounded_by_max_retention(tokenizer: Tokenizer) -> None:
    ours = EngineStub()
    async with (
        gateways_over(tokenizer, [ours]) as [(base, app)],
        aiohttp.ClientSession() as session,
    ):
        router = app[STATE].router
        router.routing = dataclasses.replace(router.routing, max_retention_s=120)
        body = {"model": "stub-model", "input": "Hi", "prompt_cache_retention": "in_memory", "store": False}
        status, _ = await post(session, f"{base}/v1/responses", body)
        assert status == 200
        status, error = await post(
            session, f"{base}/v1/chat/completions", {**BODY, "prompt_cache_retention": "1y"}
        )
        assert status == 400 and error["error"]["param"] == "prompt_cache_retention"
        status, _ = await post(session, f"{base}/v1/chat/completions", BODY)
    [sent, plain] = ours.bodies
    assert sent["kv_pin"] == [{"ttl_s": 120}]
    assert "kv_pin" not in plain


@pytest.mark.parametrize("top_level", [False, True])
async def test_messages_breakpoints_pin_their_prefixes(tokenizer: Tokenizer, top_level: bool) -> None:
    ours = EngineStub()
    system = "You are a terse assistant who answers in one word. " * 4
    body = {
        "model": "stub-model",
        "max_tokens": 3,
        "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
            {"role": "assistant", "content": "Blue."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Another?", "cache_control": {"type": "ephemeral"}}],
            },
        ],
    }
    if top_level:  # automatic caching: the last block is the breakpoint
        body["messages"][2]["content"][0].pop("cache_control")
        body["cache_control"] = {"type": "ephemeral"}
    async with (
        gateways_over(tokenizer, [ours]) as [(base, _)],
        aiohttp.ClientSession() as session,
    ):
        status, _ = await post(session, f"{base}/v1/messages", body)
        assert status == 200
    [sent] = ours.bodies
    prompt = chat_prompt_ids(tokenizer, sent["messages"])
    system_only = common_prefix(chat_prompt_ids(tokenizer, sent["messages"][:1]), prompt)
    assert 40 < system_only < len(prompt) - 10
    assert sent["kv_pin"] == [
        {"tokens": system_only, "ttl_s": 3600.0},
        {"tokens": len(prompt), "ttl_s": 300.0},
    ]


async def test_more_than_four_breakpoints_are_a_400(tokenizer: Tokenizer) -> None:
    mark = {"type": "ephemeral"}
    blocks = [{"type": "text", "text": f"part {i}", "cache_control": mark} for i in range(5)]
    body = {"model": "stub-model", "max_tokens": 3, "messages": [{"role": "user", "content": blocks}]}
    async with (
        gateways_over(tokenizer, [EngineStub()]) as [(base, _)],
        aiohttp.ClientSession() as session,
    ):
        status, error = await post(session, f"{base}/v1/messages", body)
    assert status == 400 and error["type"] == "error"
