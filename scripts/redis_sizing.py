"""How much Redis a fleet's shared index needs: ``python scripts/redis_sizing.py [--blocks N] [--workers W]``.

Fills a replica's index through a real Redis (unique key prefix, deleted afterwards) with chains of
256 blocks spread over ``W`` workers, as KV events would, writes a snapshot, and reports the bytes
Redis holds per million blocks: the snapshot, and the log of ops not yet folded into one (the log is
trimmed to the previous snapshot, so at most about two snapshot intervals of ops are ever kept).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import uuid

from redis.asyncio import Redis

from cache.index.ops import StoredOp
from cache.index.redis_store import RedisIndexStore, RedisStoreConfig, index_key_prefix

CHAIN = 256


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    prefix = f"prefixgate-sizing-{uuid.uuid4().hex[:8]}:"
    config = RedisStoreConfig(url=args.url, key_prefix=prefix, snapshot_every_ops=10**9)
    store = RedisIndexStore(config)
    redis = Redis.from_url(args.url)
    rng = random.Random(0)
    try:
        await store.start()
        ops = []
        for c in range(args.blocks // CHAIN):
            worker = f"http://10.0.0.{c % args.workers}:30000"
            ops.append(StoredOp(worker, None, [rng.getrandbits(64) for _ in range(CHAIN)]))
            if len(ops) == 64:
                await store.append_many(ops)
                ops = []
        await store.append_many(ops)
        while not await store.caught_up():
            await asyncio.sleep(0.1)
        index_keys = index_key_prefix(prefix)
        log_bytes = await redis.memory_usage(index_keys + "log", samples=0) or 0
        assert await store.write_snapshot()
        snap_bytes = await redis.memory_usage(index_keys + "snapshot", samples=0) or 0
        per_million = 1e6 / args.blocks
        print(f"{args.blocks} blocks over {args.workers} workers (chains of {CHAIN})")
        print(
            f"log of every op (before any snapshot): {log_bytes / 2**20 * per_million:.1f} MiB per million blocks"
        )
        print(f"snapshot: {snap_bytes / 2**20 * per_million:.1f} MiB per million blocks")
    finally:
        await store.close()
        keys = [k async for k in redis.scan_iter(match=prefix + "*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())
