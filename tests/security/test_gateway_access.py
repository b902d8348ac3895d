"""Who may see and change what: SSRF through the admin worker URL, the observability routes, and
tenant namespaces (salts). Stub workers on loopback; no model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cache.prompt.tokenizer import Tokenizer
from gateway.config import Tenant
from gateway.tenancy import derive_salt, load_api_keys
from tests.security.gateway_support import (
    BODY,
    CHAT,
    HostileWorker,
    gateway_over,
    shared_tokenizer,  # noqa: F401  (the ``tokenizer`` fixture)
)

ADMIN = {"Authorization": "Bearer admin-secret"}
KEYS = {"key-a": Tenant("acme", derive_salt(b"s", "acme"))}


@pytest.mark.parametrize(
    ("url", "status"),
    [
        ("http://127.0.0.1:80@example.com/", 400),  # userinfo: the host is example.com
        ("http://127.0.0.1:1@example.com:80", 400),
        ("http://127.0.0.1.example.com:80", 403),
        ("http://localhost.example.com:80", 403),
        ("http://127.0.0.1:8000/?next=http://example.com", 400),
        ("http://127.0.0.1:8000/#frag", 400),
        ("http://127.0.0.1:80\\@example.com/", 400),
        ("file:///etc/passwd", 400),
        ("http://10.0.0.1:80", 403),
        (["http://127.0.0.1:1"], 400),
    ],
)
async def test_worker_urls_are_parsed_not_prefix_matched(
    tokenizer: Tokenizer, url: object, status: int
) -> None:
    async with gateway_over(tokenizer, HostileWorker("ok"), admin_key="admin-secret") as g:
        async with g.session.post(g.base + "/admin/workers", json={"url": url}, headers=ADMIN) as r:
            assert r.status == status, await r.text()
        assert len(g.state.pool.workers) == 1


async def test_an_allowed_worker_url_is_attached(tokenizer: Tokenizer) -> None:
    async with gateway_over(
        tokenizer, HostileWorker("ok"), HostileWorker("ok"), admin_key="admin-secret"
    ) as g:
        second = g.state.pool.remove(list(g.state.pool.workers)[1])
        assert second is not None
        async with g.session.post(
            g.base + "/admin/workers", json={"url": second.url + "/"}, headers=ADMIN
        ) as r:
            assert r.status == 201


@pytest.mark.parametrize("route", ["/stats", "/metrics"])
async def test_observability_needs_the_admin_or_metrics_key_when_keys_are_set(
    tokenizer: Tokenizer, route: str
) -> None:
    async with gateway_over(
        tokenizer, HostileWorker("ok"), api_keys=KEYS, admin_key="admin-secret", metrics_key="metrics-secret"
    ) as g:
        for headers, status in [
            ({}, 401),
            ({"Authorization": "Bearer key-a"}, 401),  # a tenant must not see the others
            ({"Authorization": "Bearer wrong"}, 401),
            (ADMIN, 200),
            ({"Authorization": "Bearer metrics-secret"}, 200),
        ]:
            async with g.session.get(g.base + route, headers=headers) as r:
                assert r.status == status, (headers, r.status)
        async with g.session.get(g.base + "/dashboard") as r:
            assert r.status == 200  # the page holds no data; it sends the key to /stats
        async with g.session.get(g.base + "/dashboard/dashboard.js") as r:
            assert "Authorization" in await r.text()


async def test_observability_stays_open_without_api_keys(tokenizer: Tokenizer) -> None:
    async with gateway_over(tokenizer, HostileWorker("ok")) as g:
        for route in ("/stats", "/metrics"):
            async with g.session.get(g.base + route) as r:
                assert r.status == 200


def test_tenant_salts_are_keyed_hashes_of_a_server_secret(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"k1": {"tenant": "acme"}, "k2": {"tenant": "globex", "salt": "shared"}}))
    tenants = load_api_keys(keys_file, b"secret-1")
    assert tenants["k1"].salt not in ("acme", "") and tenants["k2"].salt != "shared"
    assert len(tenants["k1"].salt) == 64
    assert load_api_keys(keys_file, b"secret-1") == tenants  # replicas with one secret agree
    assert load_api_keys(keys_file, b"secret-2")["k1"].salt != tenants["k1"].salt


async def test_a_clients_cache_salt_never_reaches_the_worker(tokenizer: Tokenizer) -> None:
    async with gateway_over(tokenizer, HostileWorker("ok"), api_keys=KEYS) as g:
        body = {**BODY, "cache_salt": "someone-elses-salt"}
        async with g.session.post(g.base + CHAT, json=body, headers={"Authorization": "Bearer key-a"}) as r:
            assert r.status == 200
        assert g.stubs[0].bodies[-1]["cache_salt"] == KEYS["key-a"].salt
    async with gateway_over(tokenizer, HostileWorker("ok")) as g:  # no keys: the one tenant has no salt
        async with g.session.post(g.base + CHAT, json={**BODY, "cache_salt": "guess"}) as r:
            assert r.status == 200
        assert "cache_salt" not in g.stubs[0].bodies[-1]
