"""``/v1/responses`` against stub workers, through the official ``openai`` SDK (only ``base_url`` changed):
translation to and from chat completions, stored responses, chains across replicas sharing Redis."""

from __future__ import annotations

import aiohttp
import pytest
from openai import AsyncOpenAI, BadRequestError, NotFoundError

from cache.prompt.tokenizer import Tokenizer
from gateway.config import Tenant
from gateway.response_store import LocalResponseStore, ResponseStoreConfig
from tests.gateway.stub_gateways import gateways_over
from tests.gateway.test_dispatch import PIECES, StubWorker

ANSWER = "".join(PIECES)


def client(base: str, key: str = "none") -> AsyncOpenAI:
    return AsyncOpenAI(base_url=base + "/v1", api_key=key, max_retries=0)


async def test_a_response_is_a_chat_completion_translated(tokenizer: Tokenizer) -> None:
    stub = StubWorker()
    async with gateways_over(tokenizer, [stub]) as [(base, _)]:
        response = await client(base).responses.create(
            model="stub-model",
            instructions="Be brief.",
            input="Say hello.",
            max_output_tokens=3,
            temperature=0.5,
            prompt_cache_key="session-1",
        )
    assert response.output_text == ANSWER
    assert response.status == "completed"
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (7, 3)
    assert response.usage.input_tokens_details.cached_tokens == 5
    [sent] = stub.bodies
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello."},
    ]
    assert (sent["max_tokens"], sent["temperature"]) == (3, 0.5)
    assert "prompt_cache_key" not in sent and "instructions" not in sent


async def test_a_chain_continues_on_another_replica_sharing_redis(tokenizer: Tokenizer) -> None:
    stub = StubWorker()
    async with gateways_over(tokenizer, [stub], replicas=2, redis_shared=True) as [(a, _), (b, _)]:
        first = await client(a).responses.create(model="stub-model", instructions="Be brief.", input="Hi.")
        second = await client(b).responses.create(
            model="stub-model",
            previous_response_id=first.id,
            input=[{"role": "user", "content": [{"type": "input_text", "text": "Again."}]}],
        )
        assert second.previous_response_id == first.id
        fetched = await client(b).responses.retrieve(first.id)
        assert fetched.output_text == ANSWER
        await client(b).responses.delete(first.id)
        with pytest.raises(NotFoundError):
            await client(a).responses.retrieve(first.id)
        with pytest.raises(NotFoundError):
            await client(a).responses.create(model="stub-model", previous_response_id=first.id, input="x")
    # The whole conversation reached the worker, without the first request's instructions.
    assert stub.bodies[1]["messages"] == [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": "Again."},
    ]


async def test_a_streamed_response_sends_the_responses_events(tokenizer: Tokenizer) -> None:
    stub = StubWorker()
    async with gateways_over(tokenizer, [stub]) as [(base, _)]:
        openai = client(base)
        stream = await openai.responses.create(model="stub-model", input="Say hello.", stream=True)
        events = [event async for event in stream]
        completed = events[-1].response
        stored = await openai.responses.retrieve(completed.id)
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == ANSWER
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert completed.output_text == stored.output_text == ANSWER
    assert completed.usage is not None and completed.usage.input_tokens_details.cached_tokens == 5


async def test_store_false_keeps_nothing_and_unsupported_fields_are_refused(tokenizer: Tokenizer) -> None:
    async with gateways_over(tokenizer, [StubWorker()]) as [(base, _)]:
        openai = client(base)
        response = await openai.responses.create(model="stub-model", input="Hi.", store=False)
        with pytest.raises(NotFoundError):
            await openai.responses.retrieve(response.id)
        with pytest.raises(BadRequestError) as refused:
            await openai.responses.create(
                model="stub-model",
                input="Hi.",
                tools=[{"type": "web_search"}],  # function tools are served; hosted tools are not
            )
    assert refused.value.body["param"] == "tools"  # type: ignore[index]


async def test_a_tenant_never_reads_another_tenants_response(tokenizer: Tokenizer) -> None:
    keys = {"key-a": Tenant("a", "salt-a"), "key-b": Tenant("b", "salt-b")}
    async with gateways_over(tokenizer, [StubWorker()], api_keys=keys) as [(base, _)]:
        mine = await client(base, "key-a").responses.create(model="stub-model", input="Hi.")
        with pytest.raises(NotFoundError):
            await client(base, "key-b").responses.retrieve(mine.id)
        with pytest.raises(NotFoundError):
            await client(base, "key-b").responses.create(
                model="stub-model", previous_response_id=mine.id, input="x"
            )
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{base}/v1/responses/{mine.id}") as anonymous,
        ):
            assert anonymous.status == 401


async def test_the_local_store_is_bounded_by_count_and_ttl() -> None:
    now = [0.0]
    store = LocalResponseStore(ResponseStoreConfig(ttl_s=10, max_records=2), clock=lambda: now[0])
    for i in range(3):
        assert await store.put("t", f"r{i}", {"n": i})
    assert await store.get("t", "r0") is None  # the oldest, past the cap
    assert await store.get("t", "r2") == {"n": 2}
    assert await store.get("other", "r2") is None
    now[0] = 10.0
    assert await store.get("t", "r2") is None
    small = LocalResponseStore(ResponseStoreConfig(max_record_bytes=10))
    assert not await small.put("t", "big", {"text": "x" * 100})
