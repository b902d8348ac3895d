"""Tenancy: API keys map to tenants whose salts separate their caches, in the index and on workers."""

from __future__ import annotations

import uuid

import aiohttp
import pytest

from gateway.config import Tenant
from gateway.state import STATE

pytestmark = pytest.mark.slow  # real engine workers

KEYS = {"key-a": Tenant("acme", "salt-acme"), "key-b": Tenant("globex", "salt-globex")}


async def test_keys_are_required_and_tenants_do_not_share_cache(two_workers, gateway) -> None:
    async with gateway(two_workers[:1], api_keys=KEYS) as (base, app), aiohttp.ClientSession() as s:
        system = f"Shared text {uuid.uuid4().hex}. " + "Be kind. " * 40
        body = {
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}],
            "max_tokens": 1,
        }

        async def ask(key: str | None) -> tuple[int, dict]:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            async with s.post(base + "/v1/chat/completions", json=body, headers=headers) as r:
                return r.status, await r.json()

        status, error = await ask(None)
        assert status == 401 and error["error"]["code"] == "invalid_api_key"
        assert (await ask("wrong"))[0] == 401
        async with s.get(base + "/v1/models") as r:
            assert r.status == 401

        status, first = await ask("key-a")
        assert status == 200 and first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        _, other = await ask("key-b")  # same prompt, same worker, other tenant
        assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert app[STATE].metrics.recent[-1].predicted_cached_tokens == 0  # the index agreed
        _, again = await ask("key-a")
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        record = app[STATE].metrics.recent[-1]
        assert record.tenant == "acme" and record.predicted_cached_tokens == record.cached_tokens
