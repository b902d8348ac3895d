"""Registry, session pins and dashboard counters: in process, and shared through the real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis

from cache.index.redis_store import RedisIndexStore, RedisStoreConfig
from gateway.launcher import free_port
from gateway.shared_state import LocalSharedState, RedisSharedState
from tests.cache.index.redis_util import (
    SHARED_URL,
    PrivateRedis,
    delete_prefix,
    shared_redis_available,
    unique_prefix,
)

needs_redis = pytest.mark.skipif(not shared_redis_available(), reason="no Redis at 127.0.0.1:6379")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def healthy(store: RedisIndexStore) -> None:
    while store.status != "healthy":
        await asyncio.sleep(0.02)


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    prefix = unique_prefix()
    yield prefix
    delete_prefix(SHARED_URL, prefix)


async def test_local_pins_expire_and_counters_and_registry_are_kept() -> None:
    clock = Clock()
    state = LocalSharedState(clock)
    await state.pin_session("s", "w", 30)
    assert await state.pinned_worker("s") == "w"
    clock.now += 30
    assert await state.pinned_worker("s") is None and await state.pinned_worker("other") is None
    await state.incr("c")
    await state.incr("c", 2)
    assert await state.counters() == {"c": 3}
    await state.register_worker("w", {"u": 1})
    assert await state.workers() == {"w": {"u": 1}}
    await state.unregister_worker("w")
    assert await state.workers() == {}


@needs_redis
async def test_two_replicas_share_pins_counters_and_registry(prefix: str) -> None:
    config = RedisStoreConfig(url=SHARED_URL, key_prefix=prefix)
    store_a, store_b = RedisIndexStore(config), RedisIndexStore(config)
    a, b = RedisSharedState(store_a), RedisSharedState(store_b)
    await store_a.start()
    await store_b.start()
    try:
        await a.pin_session("s1", "w2", ttl_s=30)
        assert await b.pinned_worker("s1") == "w2"
        await a.pin_session("s2", "w2", ttl_s=0.05)
        await asyncio.sleep(0.1)
        assert await b.pinned_worker("s2") is None

        await a.incr("requests")
        await b.incr("requests", 2)
        assert (await a.counters())["requests"] == 3

        await a.register_worker("w2", {"url": "http://w2"})
        assert await b.workers() == {"w2": {"url": "http://w2"}}
        await b.unregister_worker("w2")
        assert await a.workers() == {}

        client = redis.Redis.from_url(SHARED_URL)  # the key names other tools (and older replicas) read
        assert client.exists(prefix + "pin:s1", prefix + "counters") == 2
        client.close()
    finally:
        await store_a.close()
        await store_b.close()


async def test_unreachable_redis_degrades_to_local_state_without_raising() -> None:
    config = RedisStoreConfig(
        url=f"redis://127.0.0.1:{free_port()}/0", key_prefix="pgtest:none:", op_timeout_s=0.2
    )
    store = RedisIndexStore(config)
    state = RedisSharedState(store)
    await store.start()
    try:
        assert store.status == "degraded"
        await state.pin_session("s", "w", 30)
        assert await state.pinned_worker("s") == "w"
        await state.incr("c", 4)
        assert await state.counters() == {"c": 4}
        await state.register_worker("w", {"url": "x"})
        assert await state.workers() == {"w": {"url": "x"}}
    finally:
        await store.close()


@pytest.mark.slow  # starts a redis-server of its own
@pytest.mark.skipif(not PrivateRedis.available(), reason="no redis-server binary")
async def test_what_redis_missed_is_pushed_when_it_comes_back() -> None:
    server = PrivateRedis()  # not started yet: the replica starts against a Redis that is down
    store = RedisIndexStore(
        RedisStoreConfig(url=server.url, key_prefix="pgtest:", op_timeout_s=0.2, retry_interval_s=0.05)
    )
    state = RedisSharedState(store)
    await store.start()
    try:
        await state.register_worker("w", {"url": "x"})
        await state.incr("requests", 3)
        assert store.status == "degraded"
        server.start()
        await asyncio.wait_for(healthy(store), timeout=30)  # the tail task re-syncs on its own
        client = redis.Redis.from_url(server.url)
        assert client.hgetall("pgtest:counters") == {b"requests": b"3"}
        assert set(client.hgetall("pgtest:workers")) == {b"w"}
        client.close()
        await state.incr("requests")
        assert await state.counters() == {"requests": 4}  # pushed once, not counted twice
    finally:
        await store.close()
        server.stop()
