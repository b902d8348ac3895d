"""Chaos: the gateway's Redis killed and restarted under load. Requests never fail (the gateway routes
from its local index while degraded), and once Redis is back the store re-syncs and what was routed
meanwhile reaches the shared log (a fresh replica sees it). A private redis-server (slow)."""

from __future__ import annotations

import asyncio

import pytest

from cache.index.redis_store import RedisIndexStore, RedisStoreConfig
from cache.prompt.tokenizer import Tokenizer
from tests.cache.index.redis_util import PrivateRedis
from tests.security.gateway_support import (
    BODY,
    CHAT,
    HostileWorker,
    gateway_over,
    shared_tokenizer,  # noqa: F401  (the ``tokenizer`` fixture)
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PrivateRedis.available(), reason="no redis-server binary"),
]


async def test_redis_cut_and_restored_under_load(tokenizer: Tokenizer) -> None:
    redis_server = PrivateRedis()
    redis_server.start()
    try:
        async with gateway_over(
            tokenizer,
            HostileWorker("ok"),
            HostileWorker("ok"),
            redis_url=redis_server.url,
            health_interval_s=0.2,
        ) as g:
            statuses: list[int] = []

            async def client(n: int, tag: str) -> None:
                for i in range(n):
                    text = f"{tag} {i}: " + "a shared prefix for the index " * 8
                    body = {**BODY, "messages": [{"role": "user", "content": text}]}
                    async with g.session.post(g.base + CHAT, json=body) as r:
                        statuses.append(r.status)

            await asyncio.gather(*(client(10, f"before-{c}") for c in range(4)))
            redis_server.stop()  # cut
            await asyncio.gather(*(client(10, f"during-{c}") for c in range(4)))
            assert g.state.store.status == "degraded"
            redis_server.start()  # restored, empty (no persistence)
            await asyncio.gather(*(client(10, f"after-{c}") for c in range(4)))
            assert statuses and set(statuses) == {200}, statuses  # 0 failed requests

            async with asyncio.timeout(60):  # hang guard: converges
                while g.state.store.status != "healthy":
                    await asyncio.sleep(0.05)
            fresh = RedisIndexStore(RedisStoreConfig(url=redis_server.url))
            await fresh.start()
            try:
                async with asyncio.timeout(60):
                    while len(fresh.index) < len(g.state.store.index):
                        await asyncio.sleep(0.05)
                assert len(fresh.index) == len(g.state.store.index) > 0
            finally:
                await fresh.close()
    finally:
        redis_server.stop()
