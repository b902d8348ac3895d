"""End to end: real gateway, two real engine workers (SmolLM2), the official openai client."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import openai
import pytest

from gateway.state import STATE

pytestmark = pytest.mark.slow  # real engine workers
TOPICS = ["astronomy", "cooking", "maritime law", "volcanoes"]


def system_prompt(topic: str, words: int = 260) -> str:
    rng = random.Random(topic)
    vocab = [
        "the",
        "river",
        "stone",
        "light",
        "careful",
        "answer",
        "question",
        "history",
        "method",
        "small",
        "report",
        "garden",
        "signal",
        "winter",
        "measure",
        "pattern",
        "engine",
        "harbor",
        "letter",
        "market",
    ]
    body = " ".join(rng.choice(vocab) for _ in range(words))
    return f"You are an expert on {topic}. Background notes: {body}. Answer briefly."


def interleaved_repeats(seed: int = 7, repeats: int = 3) -> list[str]:
    order = [t for _ in range(repeats) for t in TOPICS]
    rng = random.Random(seed)
    first, rest = order[: len(TOPICS)], order[len(TOPICS) :]
    rng.shuffle(rest)
    return first + rest


async def run_sequence(base: str, sequence: list[str]) -> list[tuple[str, int, int]]:
    """Send each topic's chat in order; returns (topic, cached_tokens, prompt_tokens) per request."""
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    out = []
    for i, topic in enumerate(sequence):
        reply = await client.chat.completions.create(
            model=(await client.models.list()).data[0].id,
            messages=[
                {"role": "system", "content": system_prompt(topic)},
                {"role": "user", "content": f"Question {i}: one word?"},
            ],
            max_tokens=2,
            temperature=0,
        )
        details = reply.usage.prompt_tokens_details
        out.append((topic, details.cached_tokens if details else 0, reply.usage.prompt_tokens))
    await client.close()
    return out


async def flush(workers: list[str]) -> None:
    async with aiohttp.ClientSession() as s:
        for url in workers:
            async with s.post(f"{url}/flush_cache") as r:
                assert r.status == 200


def repeat_hits(results: list[tuple[str, int, int]]) -> tuple[int, int]:
    seen: set[str] = set()
    hits = repeats = 0
    for topic, cached, _ in results:
        if topic in seen:
            repeats += 1
            hits += cached > 0
        seen.add(topic)
    return hits, repeats


async def test_cache_aware_routes_repeats_to_their_prefix_and_beats_round_robin(two_workers, gateway) -> None:
    sequence = interleaved_repeats()
    await flush(two_workers)
    async with gateway(two_workers, "cache_aware") as (base, app):
        aware = await run_sequence(base, sequence)
        stats = await app[STATE].stats()
    await flush(two_workers)
    async with gateway(two_workers, "round_robin") as (base, _):
        rr = await run_sequence(base, sequence)

    aware_hits, repeats = repeat_hits(aware)
    rr_hits, _ = repeat_hits(rr)
    assert aware_hits >= 0.9 * repeats, aware
    assert rr_hits < aware_hits, (rr, aware)
    # the gateway's prediction agrees with what the workers reported
    totals = stats["totals"]
    assert totals["cached_tokens"] > 0
    assert abs(totals["predicted_cached_tokens"] - totals["cached_tokens"]) <= 16 * len(sequence)


async def test_openai_client_through_gateway_streaming_and_not(two_workers, gateway) -> None:
    async with gateway(two_workers) as (base, app):
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        model = (await client.models.list()).data[0].id
        messages = [{"role": "user", "content": "Say hello."}]
        reply = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=5, temperature=0
        )
        assert reply.choices[0].message.content
        assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0

        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=5, temperature=0, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == reply.choices[0].message.content  # greedy: same answer either way

        stream = await client.completions.create(
            model=model,
            prompt="The sky is",
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
        plain = await client.completions.create(model=model, prompt="The sky is", max_tokens=4, temperature=0)
        assert plain.choices[0].text == "".join(c.choices[0].text for c in chunks if c.choices)
        await client.close()
        assert all(w.in_flight == 0 for w in app[STATE].pool)


async def test_bad_requests_get_openai_errors(two_workers, gateway) -> None:
    async with gateway(two_workers) as (base, _), aiohttp.ClientSession() as s:

        async def post(body: bytes | dict, path: str = "/v1/chat/completions") -> tuple[int, dict]:
            kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
            async with s.post(base + path, **kwargs) as r:
                return r.status, await r.json()

        status, body = await post(b"{not json")
        assert status == 400 and body["error"]["type"] == "invalid_request_error"
        status, body = await post({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})
        assert status == 404 and body["error"]["code"] == "model_not_found"
        status, body = await post({"messages": []})
        assert status == 400 and body["error"]["param"] == "messages"
        status, body = await post({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0})
        assert status == 400 and "max_tokens" in body["error"]["message"]  # the worker's own check, relayed
        status, body = await post({"prompt": 5}, "/v1/completions")
        assert status == 400 and body["error"]["param"] == "prompt"
        async with s.get(base + "/admin/workers") as r:
            assert r.status == 403  # admin routes are off without an admin key


async def test_load_returns_to_zero_after_completed_cancelled_and_failed(two_workers, gateway) -> None:
    async with gateway(two_workers) as (base, app), aiohttp.ClientSession() as s:
        body = {
            "messages": [{"role": "user", "content": "Count to fifty, slowly."}],
            "max_tokens": 64,
            "stream": True,
            "temperature": 0,
        }

        async def cancelled() -> None:
            async with s.post(base + "/v1/chat/completions", json=body) as r:
                await r.content.readline()  # first bytes arrived; walk away mid-stream

        async def completed() -> None:
            async with s.post(base + "/v1/chat/completions", json={**body, "max_tokens": 3}) as r:
                assert r.status == 200
                await r.read()

        async def failed() -> None:
            async with s.post(base + "/v1/chat/completions", json={**body, "temperature": -1}) as r:
                assert r.status == 400

        await asyncio.gather(cancelled(), completed(), failed(), cancelled(), completed())
        for _ in range(100):  # the gateway notices the disconnects asynchronously
            if all(w.in_flight == 0 for w in app[STATE].pool):
                break
            await asyncio.sleep(0.05)
        assert [w.in_flight for w in app[STATE].pool] == [0, 0]
    # the workers freed everything too: nothing running or waiting
    async with aiohttp.ClientSession() as s:
        for url in two_workers:
            for _ in range(100):
                async with s.get(url + "/get_load") as r:
                    load = await r.json()
                load = load[0] if isinstance(load, list) else load
                if load["num_reqs"] == 0 and load.get("num_waiting_reqs", 0) == 0:
                    break
                await asyncio.sleep(0.05)
            assert load["num_reqs"] == 0


@pytest.mark.parametrize("policy", ["session"])
async def test_sessions_stick_to_their_worker(two_workers, gateway, policy: str) -> None:
    async with gateway(two_workers, policy) as (base, app), aiohttp.ClientSession() as s:
        for session_id in ("alice", "bob", "carol"):
            chosen = set()
            for turn in range(3):
                body = {
                    "messages": [{"role": "user", "content": f"turn {turn}"}],
                    "max_tokens": 1,
                    "user": session_id,
                }
                async with s.post(base + "/v1/chat/completions", json=body) as r:
                    assert r.status == 200
                chosen.add(app[STATE].metrics.recent[-1].worker)
            assert len(chosen) == 1
