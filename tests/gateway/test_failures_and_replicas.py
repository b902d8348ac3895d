"""A worker dying mid-run, and two gateway replicas sharing their index through the real Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid

import aiohttp
import orjson
import pytest
import redis

from cache.api.requests import parse_request
from gateway.launcher import engine_workers
from gateway.router import PreparedRequest
from gateway.state import STATE
from gateway.tenancy import DEFAULT_TENANT
from tests.gateway.conftest import ENGINE_ARGS
from tests.gateway.test_routing_e2e import system_prompt

pytestmark = pytest.mark.slow


async def read_stream(s: aiohttp.ClientSession, url: str, body: dict) -> list[dict]:
    events = []
    async with s.post(url, json=body, timeout=aiohttp.ClientTimeout(total=120)) as r:
        assert r.status == 200
        async for line in r.content:
            if line.startswith(b"data: {"):
                events.append(orjson.loads(line[6:]))
    return events


async def test_worker_killed_mid_stream(gateway) -> None:
    with engine_workers(2, None, ENGINE_ARGS, timeout=300) as launched:
        urls = [w.url for w in launched]
        async with (
            gateway(urls, "round_robin", failure_threshold=1) as (base, app),
            aiohttp.ClientSession() as s,
        ):
            body = {
                "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
                "max_tokens": 200,
                "stream": True,
                "temperature": 0,
                "ignore_eos": True,
            }
            streams = [
                asyncio.create_task(read_stream(s, base + "/v1/chat/completions", body)) for _ in range(2)
            ]
            pool = app[STATE].pool
            while sum(w.in_flight for w in pool) < 2:  # one stream on each worker
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            victim = launched[0]
            os.killpg(victim.process.pid, signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*streams), timeout=120)
            errors = [events for events in results if any("error" in e for e in events)]
            assert len(errors) == 1  # the stream on the dead worker ended with an error event
            assert not errors[0][-1].get("choices")  # and that error was its last event
            # new requests go to the survivor; none hangs
            for _ in range(3):
                status_body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
                async with s.post(
                    base + "/v1/chat/completions", json=status_body, timeout=aiohttp.ClientTimeout(total=60)
                ) as r:
                    assert r.status == 200
                assert app[STATE].metrics.recent[-1].worker == launched[1].url
            assert [w.in_flight for w in pool] == [0, 0]


async def test_replicas_sharing_redis_agree_on_a_prefix_one_of_them_routed(two_workers, gateway) -> None:
    prefix = f"prefixgate-test-{uuid.uuid4().hex[:8]}:"
    # Approximate mode only (no KV events), so replica B can only learn from A through Redis.
    common = {"redis_url": "redis://127.0.0.1:6379/0", "redis_key_prefix": prefix, "ingest_kv_events": False}
    try:
        async with (
            gateway(two_workers, **common) as (base_a, app_a),
            gateway(two_workers, **common) as (_, app_b),
        ):
            body = {
                "messages": [
                    {"role": "system", "content": system_prompt("glaciers")},
                    {"role": "user", "content": "one word?"},
                ],
                "max_tokens": 2,
            }
            async with aiohttp.ClientSession() as s, s.post(base_a + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
            chosen_by_a = app_a[STATE].metrics.recent[-1].worker
            state_b = app_b[STATE]
            router_b = state_b.router
            ids = parse_request("chat", body, state_b.tokenizer, state_b.limits).prompt_ids
            for _ in range(100):  # B tails the Redis stream
                decision = await router_b.choose(
                    PreparedRequest("chat", body, DEFAULT_TENANT, ids, False, None, "t"), exclude=set()
                )
                if decision.reason == "cache_hit":
                    break
                await asyncio.sleep(0.05)
            assert decision.reason == "cache_hit"
            assert decision.worker.worker_id == chosen_by_a
            assert decision.predicted_cached_tokens >= len(ids) - 32
    finally:
        client = redis.Redis()
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
