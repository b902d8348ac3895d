"""The dashboard's "Prompt tokens by source" panel in headless Chromium: a real gateway in front of stub
engines whose usage reports a KV fetch (our engine's ``kv_fetched_tokens``, ``kv_fetch_seconds``); the
panel shows what /stats says. The engines' side is tests/gateway/test_fetch_plans_e2e.py."""

from __future__ import annotations

from typing import Any

import pytest

from cache.api.requests import chat_prompt_ids
from cache.index.ops import StoredOp
from cache.prompt.tokenizer import Tokenizer
from cache.wire.hashing import block_hashes, namespace_seed
from tests.gateway.test_dashboard_browser import browser, open_dashboard, polls, wait_polls  # noqa: F401
from tests.gateway.test_dispatch import CHAT
from tests.gateway.test_fetch_plans import chat_body, gateway_over_engines

pytestmark = pytest.mark.slow  # a browser


async def test_the_panel_shows_fetched_cached_and_computed_tokens(
    tokenizer: Tokenizer,
    monkeypatch: pytest.MonkeyPatch,
    browser: Any,  # noqa: F811
) -> None:
    body = chat_body()
    async with (
        gateway_over_engines(tokenizer) as (base, state, _, session),
        open_dashboard(browser, base) as page,
    ):
        assert await page.inner_text("#kv-fetch-latency") == "no KV fetches yet"
        ids = chat_prompt_ids(tokenizer, body["messages"])
        fetched = (len(ids) - 1) // 16 * 16
        details = {"cached_tokens": fetched, "kv_fetched_tokens": fetched, "kv_fetch_seconds": 0.02}
        usage = {"prompt_tokens": len(ids), "completion_tokens": 3, "prompt_tokens_details": details}
        monkeypatch.setattr("tests.gateway.test_dispatch.USAGE", usage)
        first, _ = list(state.pool)
        hashes = block_hashes(ids, 16, seed=namespace_seed("stub-model"))
        await state.store.append(StoredOp(first.worker_id, None, hashes))
        first.external_load = 5  # the second worker gets it, with a plan naming the first
        async with session.post(base + CHAT, json=body) as r:
            assert r.status == 200, await r.text()
        async with session.get(base + "/stats") as r:
            totals = (await r.json())["totals"]
        await wait_polls(page, await polls(page) + 2)
        sources = totals["prompt_tokens_by_source"]
        assert sources == {"cached": 0, "fetched": fetched, "computed": len(ids) - fetched}
        for source, tokens in sources.items():
            bar = page.locator(f'#kv-fetch [data-source="{source}"]')
            assert await bar.get_attribute("data-value") == str(tokens)
        latency = page.locator("#kv-fetch-latency")
        assert float(await latency.get_attribute("data-value")) == pytest.approx(0.02)
        assert "fetch time p50 20 ms" in await latency.inner_text()
