"""RedisIndexStore against the shared Redis at 127.0.0.1:6379 and against a Redis Cluster of its own (a
unique key prefix, cleaned up)."""

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from cache.index.ops import ApproxOp, ClearedOp, StoredOp, WorkerGoneOp
from cache.index.radix_index import MatchResult
from cache.index.redis_store import RedisIndexStore, RedisStoreConfig
from gateway.launcher import free_port
from tests.cache.index.redis_util import delete_prefix, redis_url_for, unique_prefix


@pytest.fixture(scope="module", params=["standalone", pytest.param("cluster", marks=pytest.mark.slow)])
def url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_url_for(request.param, tmp_path_factory.mktemp("redis-cluster")) as url:
        yield url


@pytest.fixture
async def prefix(url: str) -> AsyncIterator[str]:
    prefix = unique_prefix()
    yield prefix
    delete_prefix(url, prefix)


async def wait_caught_up(*stores: RedisIndexStore, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not all([await s.caught_up() for s in stores]):
        assert asyncio.get_running_loop().time() < deadline, [s.last_error for s in stores]
        await asyncio.sleep(0.02)


async def test_two_stores_share_the_index(url: str, prefix: str) -> None:
    config = RedisStoreConfig(url=url, key_prefix=prefix)
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
        await b.append(WorkerGoneOp("w2"))
        await wait_caught_up(a, b)
        assert "w2" not in a.match([1, 2])
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("scheme", ["redis://", "redis+cluster://"])
async def test_unreachable_redis_degrades_without_raising(scheme: str) -> None:
    config = RedisStoreConfig(
        url=f"{scheme}127.0.0.1:{free_port()}", key_prefix="pgtest:none:", op_timeout_s=0.2
    )
    store = RedisIndexStore(config)
    await store.start()
    try:
        assert store.status == "degraded" and store.last_error
        await store.append(StoredOp("w", None, [5, 6]))
        assert store.match([5, 6]) == {"w": MatchResult(2, 2, 0)}
        assert await store.guard(store.client.ping()) is None and store.status == "degraded"
        assert not await store.caught_up()
    finally:
        await store.close()


async def test_resync_callbacks_run_before_healthy_and_a_failing_one_is_retried(
    url: str, prefix: str
) -> None:
    store = RedisIndexStore(RedisStoreConfig(url=url, key_prefix=prefix, retry_interval_s=0.01))
    calls: list[str] = []

    async def flaky() -> None:
        calls.append(store.status)
        if len(calls) == 1:
            raise ConnectionError("first push fails")

    store.on_resync(flaky)
    await store.start()
    try:
        assert calls == ["degraded"] and store.status == "degraded"  # the failed push failed the sync
        await wait_caught_up(store)
        assert calls == ["degraded", "degraded"]  # retried once, and healthy only after it succeeded
    finally:
        await store.close()
