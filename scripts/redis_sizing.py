"""How much Redis a fleet's shared index needs: ``python scripts/redis_sizing.py [--blocks N] [--chain C]``.

Fills a replica's index through a real Redis (a scratch key prefix, deleted afterwards) with chains of
``C`` blocks spread over ``W`` workers, as KV events would, writes a snapshot, and reports the bytes Redis
holds per million blocks: the log of ops not yet folded into a snapshot (the log is trimmed to the
previous snapshot, so at most about two snapshot intervals of ops are ever kept) and the snapshot, each by
``MEMORY USAGE`` of its key and by Redis' ``used_memory`` (``INFO memory``) before and after, which also
counts the allocator's and the keyspace's overhead, and the transient peak of writing the snapshot. ``used_memory`` means something only on a Redis that
nothing else writes to meanwhile: point ``--url`` at a scratch ``redis-server`` (not a cluster).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import uuid

from redis.asyncio import Redis

from cache.index.ops import StoredOp
from cache.index.redis_store import RedisIndexStore, RedisStoreConfig, index_key_prefix

MiB = 2**20


async def used_memory(redis: Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def settled_memory(redis: Redis) -> int:
    """``used_memory`` once Redis has shrunk the writer's query buffer (it held the snapshot being written,
    and MULTI a queued copy of it: about twice the snapshot, freed by Redis' client cron within seconds)."""
    for _ in range(100):
        if int((await redis.info("memory"))["mem_clients_normal"]) < MiB:
            break
        await asyncio.sleep(0.1)
    return await used_memory(redis)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--chain", type=int, default=256, help="blocks per stored chain (one KV event)")
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    prefix = f"prefixgate-sizing-{uuid.uuid4().hex[:8]}:"
    # a generous op timeout: a flush that times out is re-sent, and would count its ops twice
    config = RedisStoreConfig(url=args.url, key_prefix=prefix, snapshot_every_ops=10**9, op_timeout_s=10.0)
    store = RedisIndexStore(config)
    redis = Redis.from_url(args.url)
    rng = random.Random(0)
    per_million = 1e6 / args.blocks
    before = await used_memory(redis)
    try:
        await store.start()
        ops = []
        for c in range(args.blocks // args.chain):
            worker = f"http://10.0.0.{c % args.workers}:30000"
            ops.append(StoredOp(worker, None, [rng.getrandbits(64) for _ in range(args.chain)]))
            if len(ops) == 64:
                await store.append_many(ops)
                ops = []
        await store.append_many(ops)
        while not await store.caught_up():
            await asyncio.sleep(0.1)
        index_keys = index_key_prefix(prefix)
        log_bytes = await redis.memory_usage(index_keys + "log", samples=0) or 0
        with_log = await settled_memory(redis)
        assert await store.write_snapshot()
        snap_bytes = await redis.memory_usage(index_keys + "snapshot", samples=0) or 0
        writing = await used_memory(redis)
        with_snapshot = await settled_memory(redis)
        print(
            f"{args.blocks} blocks over {args.workers} workers (chains of {args.chain}), MiB per million blocks:"
        )
        print(f"  log of every op, MEMORY USAGE:      {log_bytes / MiB * per_million:8.1f}")
        print(f"  log of every op, used_memory delta: {(with_log - before) / MiB * per_million:8.1f}")
        print(f"  snapshot, MEMORY USAGE:             {snap_bytes / MiB * per_million:8.1f}")
        print(f"  snapshot, used_memory delta:        {(with_snapshot - with_log) / MiB * per_million:8.1f}")
        print(f"  ... right after writing it:         {(writing - with_log) / MiB * per_million:8.1f}")
    finally:
        await store.close()
        keys = [k async for k in redis.scan_iter(match=prefix + "*")]
        if keys:
            await redis.delete(*keys)
        print(
            f"  after clean-up, used_memory delta:  {(await used_memory(redis) - before) / MiB * per_million:8.1f}"
        )
        await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())
