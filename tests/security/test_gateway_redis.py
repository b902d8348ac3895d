"""Redis content is not trusted: what another process (or an attacker with Redis access) writes under
the gateway's key prefix must not break /stats, make replicas re-download a corrupt snapshot four times
a second forever, or break every replica's snapshot writes. The shared Redis, a unique key prefix."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgpack
import pytest
import redis.asyncio as aioredis

from cache.index.ops import StoredOp
from cache.index.redis_store import RedisIndexStore, RedisStoreConfig, index_key_prefix
from cache.prompt.tokenizer import Tokenizer
from tests.cache.index.redis_util import SHARED_URL, delete_prefix, shared_redis_available, unique_prefix
from tests.security.gateway_support import (
    HostileWorker,
    gateway_over,
    shared_tokenizer,  # noqa: F401  (the ``tokenizer`` fixture)
)

pytestmark = pytest.mark.skipif(not shared_redis_available(), reason="no Redis at 127.0.0.1:6379")


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    prefix = unique_prefix()
    yield prefix
    delete_prefix(SHARED_URL, prefix)


async def until(condition, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``condition`` (a hang guard, not a measurement)."""
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.02)


async def test_a_non_integer_counter_does_not_break_stats(tokenizer: Tokenizer, prefix: str) -> None:
    async with gateway_over(
        tokenizer, HostileWorker("ok"), redis_url=SHARED_URL, redis_key_prefix=prefix
    ) as g:
        client = aioredis.Redis.from_url(SHARED_URL)
        await client.hset(prefix + "counters", mapping={"dash|cluster|requests": "lots", "x": b"\xff\xfe"})
        await client.hset(prefix + "workers", "evil", b"\xc1 not msgpack")
        await client.aclose()
        async with g.session.get(g.base + "/stats") as r:
            assert r.status == 200
            assert (await r.json())["store_errors"]["bad_shared_values"] >= 2
        assert "evil" not in await g.state.shared.workers()


async def test_a_corrupt_snapshot_is_reported_and_retried_with_backoff(prefix: str) -> None:
    config = RedisStoreConfig(
        url=SHARED_URL, key_prefix=prefix, retry_interval_s=0.01, max_retry_interval_s=0.2
    )
    keys = index_key_prefix(prefix)
    client = aioredis.Redis.from_url(SHARED_URL)
    await client.set(keys + "epoch", "e1")
    await client.set(keys + "snapshot", msgpack.packb({"epoch": "e1", "covered": "0-0", "index": b"garbage"}))
    store = RedisIndexStore(config)
    await store.start()
    try:
        await until(lambda: asyncio.sleep(0, store.errors["corrupt_snapshots"] >= 8))
        assert store.status == "degraded" and "corrupt" in (store.last_error or "")
        assert store.retry_delay_s == config.max_retry_interval_s  # backed off to the cap, not 4x a second
        await client.set(keys + "snapshot", b"\xc1")  # not even msgpack: the same report
        before = store.errors["corrupt_snapshots"]
        await until(lambda: asyncio.sleep(0, store.errors["corrupt_snapshots"] > before))
    finally:
        await store.close()
        await client.aclose()


async def test_a_malformed_log_entry_is_skipped_and_snapshots_still_write(prefix: str) -> None:
    config = RedisStoreConfig(url=SHARED_URL, key_prefix=prefix)
    a, b = RedisIndexStore(config), RedisIndexStore(config)
    await a.start()
    await b.start()
    client = aioredis.Redis.from_url(SHARED_URL)
    try:
        log = index_key_prefix(prefix) + "log"
        for bad in (
            msgpack.packb(["S", "w", None, ["not", "hashes"], 0]),  # decodes, but would break every dump
            msgpack.packb(["S", "w", None, [-1], 0]),  # not a u64
            msgpack.packb(["A", "w", None, [1], "never"]),
            msgpack.packb(["S", 7, None, [1], 0]),
            b"\xc1",
        ):
            await client.xadd(log, {"op": bad})
        await client.xadd(log, {"nothing": b"here"})
        await a.append(StoredOp("w", None, [11, 12]))
        await until(lambda: asyncio.sleep(0, "w" in b.index.match([11, 12])))
        assert b.errors["bad_log_entries"] == 6
        assert all(isinstance(h, int) and h < 2**64 for h in b.index._blocks)
        assert await b.write_snapshot() and await a.write_snapshot()
    finally:
        await a.close()
        await b.close()
        await client.aclose()
