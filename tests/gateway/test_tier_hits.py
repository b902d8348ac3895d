"""KV tiers at the gateway: hits per tier on /metrics and /stats (a routed request's predicted cached tokens
split by the fastest tier holding them on its worker), and lower-tier hits weighed by what each worker
measured of its load-back cost. Stub workers on loopback, no model; the dashboard's bars in headless
Chromium (``tests/gateway/test_dashboard_browser``)."""

from __future__ import annotations

import pytest

from cache.index.ops import RemovedOp, StoredOp
from cache.planning.load_profile import KVLoadCost, LoadProfile
from cache.prompt.tokenizer import Tokenizer
from cache.wire.tiers import Tier
from gateway.config import GatewayConfig, RoutingConfig
from gateway.state import STATE
from tests.gateway.conftest import running_gateway
from tests.gateway.test_dashboard_browser import browser, open_dashboard, wait_polls  # noqa: F401
from tests.gateway.test_dispatch import CHAT, Setup, gateway_over
from tests.gateway.test_pd_advisor import stub_workers

LONG = {"messages": [{"role": "user", "content": " ".join(f"word{i}" for i in range(120))}], "max_tokens": 3}


async def route_a_prompt_held_in_every_tier(g: Setup) -> tuple[dict[str, int], list[int]]:
    """Route ``LONG`` twice to the one stub worker; between the two, its prompt's blocks move in the index
    as the worker's KV events would say: all but two demoted to the host tier, then all but two more
    evicted to disk only. Returns the second request's expected split by tier, and the prompt's blocks."""
    async with g.session.post(g.base + CHAT, json=LONG) as r:
        assert r.status == 200
    worker, store = g.worker(0).worker_id, g.state.store
    chain = [h for h, *_ in reversed(list(store.index.tier_masks()))]  # stored deepest first
    await store.append_many(
        [
            RemovedOp(worker, chain[2:], Tier.DEVICE),
            StoredOp(worker, None, chain[2:], Tier.HOST),
            StoredOp(worker, None, chain[4:], Tier.DISK),
            RemovedOp(worker, chain[4:], Tier.HOST),
        ]
    )
    async with g.session.post(g.base + CHAT, json=LONG) as r:
        assert r.status == 200
    record = g.state.metrics.recent[-1]
    predicted = record.predicted_cached_tokens
    assert predicted > 64
    expected = {"device": 32, "host": 32, "disk": predicted - 64}
    assert record.predicted_by_tier() == expected
    return expected, chain


async def test_predicted_hits_are_counted_per_tier(tokenizer: Tokenizer) -> None:
    async with gateway_over(tokenizer, "ok") as g:
        expected, chain = await route_a_prompt_held_in_every_tier(g)
        worker = g.worker(0).worker_id
        registry = g.state.metrics.registry
        for tier, tokens in expected.items():
            assert (
                registry.get_sample_value("prefixgate_routed_cached_tokens_total", {"tier": tier}) == tokens
            )
        async with g.session.get(g.base + "/stats") as r:
            stats = await r.json()
        assert stats["totals"]["predicted_cached_tokens_by_tier"] == expected
        (shown,) = stats["workers"]
        assert (shown["index_host_blocks"], shown["index_disk_blocks"]) == (2, len(chain) - 4)
        async with g.session.get(g.base + "/metrics") as r:
            text = await r.text()
        assert f'prefixgate_routed_cached_tokens_total{{tier="disk"}} {float(expected["disk"])}' in text
        assert f'prefixgate_index_blocks{{tier="disk",worker="{worker}"}}' in text


async def test_the_gateway_weighs_lower_tiers_by_what_each_worker_measured(tokenizer: Tokenizer) -> None:
    measured = LoadProfile(kv_load=KVLoadCost(prefill_s_per_token=1e-3, host_s_per_token=2e-4))
    async with stub_workers(("mixed", measured), ("mixed", LoadProfile())) as urls:
        config = GatewayConfig(workers=tuple(urls), routing=RoutingConfig(host_tier_weight=0.3))
        async with running_gateway(config, tokenizer) as (_, app):
            state = app[STATE]
            await state.pool.check_all()  # the periodic check reads each worker's GET /load_profile
            policy, (w0, w1) = state.router.policy, list(state.pool)
            assert w0.load_profile is not None and w0.load_profile.kv_load == measured.kv_load
            assert policy.tier_weight(w0, Tier.HOST) == pytest.approx(0.8)  # 1 - 0.2 ms / 1 ms
            assert policy.tier_weight(w0, Tier.DISK) == 0.3  # no page file read yet: the flag's constant
            assert policy.tier_weight(w1, Tier.HOST) == 0.3  # measured nothing of its tiers
            shown = [w["hit_weights"] for w in (await state.stats())["workers"]]
            assert shown == [{"host": pytest.approx(0.8), "disk": 0.3}, {"host": 0.3, "disk": 0.3}]


@pytest.mark.slow  # a browser
async def test_the_dashboard_shows_predicted_hits_by_tier(tokenizer: Tokenizer, browser) -> None:  # noqa: F811
    async with gateway_over(tokenizer, "ok") as g:
        expected, _ = await route_a_prompt_held_in_every_tier(g)
        async with open_dashboard(browser, g.base) as page:
            await wait_polls(page, 2)
            for tier, tokens in expected.items():
                bar = page.locator(f'#tier-hits [data-tier="{tier}"]')
                assert await bar.get_attribute("data-value") == str(tokens)
            assert "predicted cached tokens" in await page.locator("#tier-hits-scope").inner_text()
