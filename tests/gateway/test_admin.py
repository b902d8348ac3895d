"""Admin routes: key required, worker URLs restricted, policy switch, cache flush fan-out."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from gateway.state import STATE

pytestmark = pytest.mark.slow  # real engine workers

ADMIN = {"Authorization": "Bearer admin-secret"}


async def test_admin_routes(two_workers, gateway) -> None:
    async with (
        gateway(two_workers[:1], admin_key="admin-secret") as (base, app),
        aiohttp.ClientSession() as s,
    ):
        async with s.get(base + "/admin/workers") as r:
            assert r.status == 401
        async with s.get(base + "/admin/workers", headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with s.post(base + "/admin/workers", json={"url": "http://example.com:80"}, headers=ADMIN) as r:
            assert r.status == 403 and (await r.json())["error"]["param"] == "url"
        async with s.post(base + "/admin/workers", json={"url": two_workers[1]}, headers=ADMIN) as r:
            assert r.status == 201 and (await r.json())["healthy"]
        async with s.get(base + "/admin/workers", headers=ADMIN) as r:
            assert {w["url"] for w in (await r.json())["workers"]} == set(two_workers)

        async with s.post(base + "/admin/policy", json={"policy": "round_robin"}, headers=ADMIN) as r:
            assert r.status == 200
        assert app[STATE].router.policy.name == "round_robin"
        async with s.post(base + "/admin/policy", json={"policy": "nope"}, headers=ADMIN) as r:
            assert r.status == 400

        body = {"messages": [{"role": "user", "content": "Tell me about the sea. " * 20}], "max_tokens": 1}
        async with s.post(base + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
        index = app[STATE].store.index
        for _ in range(100):  # KV events arrive asynchronously
            if len(index):
                break
            await asyncio.sleep(0.05)
        assert len(index) > 0
        async with s.post(base + "/flush_cache", headers=ADMIN) as r:
            assert r.status == 200
            assert all((await r.json())["flushed"].values())
        for _ in range(100):  # events still in flight (BlockStored, then the flush's AllBlocksCleared)
            if len(index) == 0:
                break
            await asyncio.sleep(0.05)
        assert len(index) == 0
        async with s.post(base + "/v1/chat/completions", json=body) as r:
            assert (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

        async with s.delete(base + "/admin/workers", params={"id": two_workers[1]}, headers=ADMIN) as r:
            assert r.status == 200
        assert [w.url for w in app[STATE].pool] == [two_workers[0]]
