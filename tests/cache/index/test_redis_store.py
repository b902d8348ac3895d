"""RedisIndexStore against the shared Redis at 127.0.0.1:6379 (unique key prefix, cleaned up)."""

import asyncio
from collections.abc import AsyncIterator

import pytest

from cache.index.ops import ApproxOp, ClearedOp, StoredOp
from cache.index.radix_index import MatchResult
from cache.index.redis_store import RedisIndexStore, RedisStoreConfig
from tests.cache.index.redis_util import (
    SHARED_URL,
    delete_prefix,
    free_port,
    shared_redis_available,
    unique_prefix,
)

pytestmark = pytest.mark.skipif(not shared_redis_available(), reason="no Redis at 127.0.0.1:6379")


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    prefix = unique_prefix()
    yield prefix
    delete_prefix(SHARED_URL, prefix)


async def wait_caught_up(*stores: RedisIndexStore, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not all([await s.caught_up() for s in stores]):
        assert asyncio.get_running_loop().time() < deadline, [s.last_error for s in stores]
        await asyncio.sleep(0.02)


async def test_two_stores_share_index_pins_counters_and_registry(prefix: str) -> None:
    config = RedisStoreConfig(url=SHARED_URL, key_prefix=prefix)
    a, b = RedisIndexStore(config), RedisIndexStore(config)
    await a.start()
    await b.start()
    try:
        assert a.status == b.status == "healthy"
        await a.append(StoredOp("w1", None, [1, 2, 3]))
        assert a.match([1, 2, 3]) == {"w1": MatchResult(3, 3, 0)}  # own writes are visible at once
        await b.append_many([StoredOp("w2", None, [1, 2]), ApproxOp("w3", None, [1], 4e9)])
        await wait_caught_up(a, b)
        for store in (a, b):
            assert store.match([1, 2, 3]) == {
                "w1": MatchResult(3, 3, 0),
                "w2": MatchResult(2, 2, 0),
                "w3": MatchResult(1, 1, 0),
            }
        await a.append(ClearedOp("w1"))
        await wait_caught_up(a, b)
        assert "w1" not in b.match([1, 2, 3])

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
        await wait_caught_up(a, b)
        assert await a.workers() == {} and "w2" not in a.match([1, 2])
    finally:
        await a.close()
        await b.close()


async def test_unreachable_redis_degrades_without_raising() -> None:
    config = RedisStoreConfig(
        url=f"redis://127.0.0.1:{free_port()}/0", key_prefix="pgtest:none:", op_timeout_s=0.2
    )
    store = RedisIndexStore(config)
    await store.start()
    try:
        assert store.status == "degraded" and store.last_error
        await store.append(StoredOp("w", None, [5, 6]))
        assert store.match([5, 6]) == {"w": MatchResult(2, 2, 0)}
        await store.pin_session("s", "w", 30)
        assert await store.pinned_worker("s") == "w"
        await store.incr("c", 4)
        assert await store.counters() == {"c": 4}
        await store.register_worker("w", {"url": "x"})
        assert await store.workers() == {"w": {"url": "x"}}
        assert not await store.caught_up()
    finally:
        await store.close()
