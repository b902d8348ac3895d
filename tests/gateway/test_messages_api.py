"""``/v1/messages`` against stub workers, through the official ``anthropic`` SDK (only ``base_url``
changed): translation, usage from the worker's cached_tokens, cache_control pins, Anthropic errors."""

from __future__ import annotations

import aiohttp
import pytest
from anthropic import AsyncAnthropic, BadRequestError

from cache.prompt.tokenizer import Tokenizer
from gateway.config import Tenant
from gateway.messages_api import translate
from gateway.router import PreparedRequest, Router
from gateway.state import STATE
from tests.gateway.stub_gateways import gateways_over
from tests.gateway.test_dispatch import PIECES, StubWorker

ANSWER = "".join(PIECES)
SYSTEM = [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]


def client(base: str, key: str = "none") -> AsyncAnthropic:
    return AsyncAnthropic(base_url=base, api_key=key, max_retries=0)


async def test_a_message_with_cache_control_reports_cache_usage_and_pins(tokenizer: Tokenizer) -> None:
    stub = StubWorker()
    keys = {"key-a": Tenant("a", "salt-a")}
    async with gateways_over(tokenizer, [stub], api_keys=keys) as [(base, app)]:
        body = {
            "model": "stub-model",
            "max_tokens": 3,
            "system": SYSTEM,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}],
            "stop_sequences": ["\n\n"],
        }
        # The SDK sends the key as x-api-key; this SDK has no temperature argument, the API still takes it.
        message = await client(base, "key-a").messages.create(**body, extra_body={"temperature": 0.2})
        chat, session, ttl_s = translate(body)
        state = app[STATE]
        req = PreparedRequest("chat", chat, keys["key-a"], [], False, session, "t")
        pinned = await state.shared.pinned_worker(Router._session_key(req))
    assert message.content[0].text == ANSWER  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    usage = message.usage
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (5, 2)
    assert (usage.input_tokens, usage.output_tokens) == (0, 3)
    assert ttl_s == 3600 and pinned == next(iter(state.pool)).worker_id
    [sent] = stub.bodies
    assert sent["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello."},
    ]
    assert (sent["stop"], sent["temperature"], sent["max_tokens"]) == (["\n\n"], 0.2, 3)


async def test_a_streamed_message_sends_anthropics_events(tokenizer: Tokenizer) -> None:
    async with gateways_over(tokenizer, [StubWorker()]) as [(base, _)]:
        stream = await client(base).messages.create(
            model="stub-model",
            max_tokens=3,
            system="You are terse.",
            messages=[{"role": "user", "content": "Say hello."}],
            stream=True,
        )
        events = [event async for event in stream]
    types = [e.type for e in events]
    assert types[:2] == ["message_start", "content_block_start"]
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == ANSWER  # type: ignore[union-attr]
    final = events[-2].usage  # type: ignore[union-attr]
    assert (final.input_tokens, final.cache_read_input_tokens, final.output_tokens) == (2, 5, 3)


async def test_errors_on_this_route_are_in_anthropics_shape(tokenizer: Tokenizer) -> None:
    async with gateways_over(tokenizer, [StubWorker("bad_request")]) as [(base, _)]:
        with pytest.raises(BadRequestError):
            await client(base).messages.create(
                model="stub-model", max_tokens=3, messages=[{"role": "user", "content": "Hi."}]
            )
        async with aiohttp.ClientSession() as session:
            missing = {"model": "stub-model", "messages": [{"role": "user", "content": "Hi."}]}
            async with session.post(f"{base}/v1/messages", json=missing) as refused:
                assert refused.status == 400
                body = await refused.json()
            async with session.post(f"{base}/v1/messages", json={**missing, "max_tokens": 3}) as from_worker:
                assert from_worker.status == 400
                worker_body = await from_worker.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    assert worker_body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "stub refuses"},
    }


async def test_an_unknown_api_key_is_refused_in_anthropics_shape(tokenizer: Tokenizer) -> None:
    keys = {"key-a": Tenant("a", "salt-a")}
    body = {"max_tokens": 3, "messages": [{"role": "user", "content": "Hi."}]}
    async with (
        gateways_over(tokenizer, [StubWorker()], api_keys=keys) as [(base, _)],
        aiohttp.ClientSession() as session,
        session.post(f"{base}/v1/messages", json=body, headers={"x-api-key": "nope"}) as refused,
    ):
        assert refused.status == 401
        assert (await refused.json())["error"]["type"] == "authentication_error"
