"""The dashboard in headless Chromium (Debian's ``chromium``, driven by Playwright) while real traffic
flows through a real gateway to the two real engine workers; and two replicas sharing the real Redis.

Chromium must be installed (``apt-get install -y chromium``): the test fails, never skips, without it.
Playwright drives that binary; it never downloads a browser of its own. Screenshots go to artifacts/.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis
from aiohttp.test_utils import TestServer

from cache.index.ops import StoredOp
from gateway.launcher import free_port
from gateway.state import STATE
from tests.gateway.test_routing_e2e import TOPICS, system_prompt
from tests.gateway.test_workers import EngineStandIn

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
REDIS_URL = "redis://127.0.0.1:6379/0"
pytestmark = pytest.mark.slow  # real engine workers and a browser


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    if not Path(CHROMIUM).is_file() or shutil.which(CHROMIUM) is None:
        pytest.fail(
            f"{CHROMIUM} is missing: the dashboard browser test needs Debian's chromium. Install it with "
            "`DEBIAN_FRONTEND=noninteractive apt-get install -y chromium` (as root)."
        )
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


@contextlib.asynccontextmanager
async def open_dashboard(browser, base: str) -> AsyncIterator[object]:  # type: ignore[no-untyped-def]
    """A page on ``base``/dashboard that fails the test on script errors or any request off ``base``."""
    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"script error: {exc}"))
    page.on(
        "console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None
    )
    page.on(
        "request", lambda r: None if r.url.startswith(base + "/") else problems.append(f"fetched {r.url}")
    )
    await page.goto(base + "/dashboard")
    await wait_polls(page, 1)
    try:
        yield page
        assert not problems, problems
    finally:
        await page.close()


async def polls(page) -> int:  # type: ignore[no-untyped-def]
    return int(await page.get_attribute("body", "data-polls"))


async def wait_polls(page, count: int, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Until the page has finished ``count`` polls of /stats (polled from here: the page's CSP forbids
    the eval that ``wait_for_function`` needs, and that is how it should be)."""
    for _ in range(int(timeout_s / 0.05)):
        if await polls(page) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the dashboard did not complete {count} polls in {timeout_s} s")


async def shown(page, element_id: str) -> str:  # type: ignore[no-untyped-def]
    return await page.get_attribute(f"#{element_id}", "data-value")


async def get_stats(s: aiohttp.ClientSession, base: str) -> dict:
    async with s.get(base + "/stats") as r:
        assert r.status == 200
        return await r.json()


async def traffic(s: aiohttp.ClientSession, base: str, requests: int, concurrency: int = 2) -> None:
    """Chats over a few shared system prompts (repeats hit the cache), streamed and not, short answers."""
    queue = list(range(requests))

    async def client() -> None:
        while queue:
            i = queue.pop(0)
            body = {
                "messages": [
                    {"role": "system", "content": system_prompt(TOPICS[i % 3], words=120)},
                    {"role": "user", "content": f"Question {i}: one word?"},
                ],
                "max_tokens": 6,
                "temperature": 0,
                "ignore_eos": True,
                "stream": i % 4 != 3,
            }
            async with s.post(base + "/v1/chat/completions", json=body) as r:
                assert r.status == 200, await r.text()
                await r.read()

    await asyncio.gather(*(client() for _ in range(concurrency)))


async def test_dashboard_follows_live_traffic_and_agrees_with_stats(two_workers, gateway, browser) -> None:
    async with (
        gateway(two_workers) as (base, app),
        aiohttp.ClientSession() as s,
        open_dashboard(browser, base) as page,
    ):
        assert await shown(page, "kpi-requests") == "0"
        flowing = asyncio.create_task(traffic(s, base, requests=24))
        seen: list[int] = []
        try:
            while not flowing.done():
                # Whatever the page shows came from a /stats fetched after `before` and before `after`:
                # two completed polls after `before` guarantee the first condition.
                before = (await get_stats(s, base))["totals"]["requests"]
                await wait_polls(page, await polls(page) + 2)
                on_page = int(await shown(page, "kpi-requests"))
                after = (await get_stats(s, base))["totals"]["requests"]
                assert before <= on_page <= after
                seen.append(on_page)
            await flowing
        finally:
            flowing.cancel()
        assert len(set(seen)) >= 2, f"the request count on the page never moved: {seen}"

        # Traffic has stopped: the next complete poll shows exactly what /stats says (three polls: the
        # gateway's once-a-second sample for the charts has counted the last request too).
        await wait_polls(page, await polls(page) + 3)
        stats = await get_stats(s, base)
        totals = stats["totals"]
        assert totals["requests"] == 24 == int(await shown(page, "kpi-requests"))
        for element_id, key in [
            ("kpi-hit-actual", "hit_rate_actual"),
            ("kpi-hit-predicted", "hit_rate_predicted"),
            ("kpi-saved", "prompt_tokens_saved"),
            ("kpi-errors", "errors"),
            ("kpi-ttft", "ttft_p50_s"),
            ("kpi-tpot", "tpot_p50_s"),
        ]:
            assert float(await shown(page, element_id)) == pytest.approx(totals[key]), element_id
        assert totals["hit_rate_actual"] > 0.3  # three prompts, 24 requests: most of them hit
        # The hit-rate chart is over the same requests as its card: its latest point is the card's figure.
        assert float(await page.get_attribute("#chart-hit", "data-last")) == pytest.approx(
            totals["hit_rate_actual"]
        )
        assert await page.inner_text("#kpi-hit-actual") == f"{100 * totals['hit_rate_actual']:.1f}%"
        assert totals["tpot_p50_s"] is not None and "ms" in await page.inner_text("#kpi-tpot")
        basis = f"over the last {totals['ttft_samples']} streamed requests"  # exact, and says over what
        assert basis in await page.inner_text("#kpi-ttft-sub")

        # Tables: workers, routing decisions, recent requests (newest first), all as /stats has them.
        worker_rows = page.locator("#workers tbody tr")
        assert await worker_rows.count() == 2
        for w in stats["workers"]:
            row = page.locator(f'#workers tbody tr[data-worker="{w["id"]}"]')
            assert (await row.locator("td").nth(5).inner_text()) == str(w["routed"])
            assert (await row.locator("td").nth(6).inner_text()) == f"{w['index_device_blocks']:,}"
            assert w["kind"] == "prefixgate" and w["instance_id"]  # each process names itself
            share = min(1.0, w["index_device_blocks"] / w["device_capacity_blocks"])  # of its own pool
            bar = row.locator('[data-tier="device"]')
            assert float(await bar.get_attribute("data-value")) == pytest.approx(share)
            assert await row.locator('[data-tier="host"]').count() == 0  # no host tier: no bar
        assert len({w["instance_id"] for w in stats["workers"]}) == 2
        for decision, count in totals["routing"].items():
            bar = page.locator(f'#routing [data-decision="{decision}"]')
            assert await bar.get_attribute("data-value") == str(count)
        recent_rows = page.locator("#recent tbody tr")
        assert await recent_rows.count() == len(stats["recent"])
        assert await recent_rows.first.get_attribute("data-request") == stats["recent"][-1]["request_id"]
        assert all(r["tpot_s"] for r in stats["recent"] if r["stream"])  # TPOT recorded for streams

        # The charts drew the history; a page opened now gets it at once from the gateway's ring buffer.
        for chart in ("chart-hit", "chart-tokens", "chart-ttft", "chart-tpot"):
            assert int(await page.get_attribute(f"#{chart}", "data-points")) > 0, chart
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        async with open_dashboard(browser, base) as fresh:
            assert int(await fresh.get_attribute("#chart-hit", "data-points")) > 0
            assert await fresh.is_hidden("#replicas-panel")  # one gateway, no shared store: no cluster
        assert app[STATE].dashboard.cluster is None


async def test_two_replicas_sharing_redis_show_cluster_figures(two_workers, gateway, browser) -> None:
    prefix = f"prefixgate-test-{uuid.uuid4().hex[:8]}:"
    common = {"redis_url": REDIS_URL, "redis_key_prefix": prefix}
    try:
        async with (
            gateway(two_workers, **common) as (base_a, app_a),
            gateway(two_workers, **common) as (base_b, app_b),
            aiohttp.ClientSession() as s,
        ):
            await traffic(s, base_a, requests=6)
            await traffic(s, base_b, requests=4)
            for _ in range(100):  # each replica pushes and reads the counters once a second
                stats_a, stats_b = await get_stats(s, base_a), await get_stats(s, base_b)
                if all(
                    st.get("cluster", {}).get("totals", {}).get("requests") == 10
                    and st["cluster"]["live_replicas"] == 2
                    for st in (stats_a, stats_b)
                ):
                    break
                await asyncio.sleep(0.2)
            local_a, local_b = stats_a["totals"], stats_b["totals"]
            assert (local_a["requests"], local_b["requests"]) == (6, 4)
            cluster = stats_b["cluster"]
            assert cluster["totals"]["requests"] == 10 and cluster["live_replicas"] == 2
            replicas = {r["id"]: r for r in cluster["replicas"]}
            assert replicas[app_a[STATE].replica_id]["requests"] == 6
            assert replicas[app_b[STATE].replica_id]["requests"] == 4
            cached = local_a["cached_tokens"] + local_b["cached_tokens"]
            assert cluster["totals"]["prompt_tokens_saved"] == cached
            assert stats_a["cluster"]["totals"]["hit_rate_actual"] == pytest.approx(
                cluster["totals"]["hit_rate_actual"]
            )
            routed = {
                k: local_a["routing"].get(k, 0) + local_b["routing"].get(k, 0)
                for k in cluster["totals"]["routing"]
            }
            assert cluster["totals"]["routing"] == routed
            assert not any(k.startswith("dash|") for k in stats_b["shared_counters"])

            async with open_dashboard(browser, base_b) as page:
                await wait_polls(page, 2)
                assert await shown(page, "kpi-requests") == "10"  # the cluster's total by default
                assert await page.locator("#replicas tbody tr").count() == 2
                await page.screenshot(path=str(ARTIFACTS / "dashboard-cluster.png"), full_page=True)
                await page.click('#scope-switch button[data-scope="replica"]')
                assert await shown(page, "kpi-requests") == "4"  # this replica's own
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)


async def test_cache_bars_are_scaled_to_each_workers_capacity_and_an_unreachable_worker_says_so(
    gateway, browser
) -> None:
    """A small worker full to the brim must look full next to a big one that holds ten times more (bars
    once scaled to the busiest worker showed it a tenth full); a worker that never answered is shown as
    unreachable, not as an OpenAI upstream."""
    small, big = (
        EngineStandIn("small", capacity_tokens=64 * 16),
        EngineStandIn("big", capacity_tokens=6400 * 16),
    )
    async with contextlib.AsyncExitStack() as stack:
        urls = []
        for standin in (small, big):
            server = await stack.enter_async_context(TestServer(standin.app(), host="127.0.0.1"))
            urls.append(str(server.make_url("")).rstrip("/"))
        nowhere = f"http://127.0.0.1:{free_port()}"
        base, app = await stack.enter_async_context(gateway([*urls, nowhere]))
        state = app[STATE]
        await state.store.append(StoredOp(urls[0], None, list(range(1, 65))))  # all 64 of its blocks
        await state.store.append(StoredOp(urls[1], None, list(range(100, 740))))  # 640 of 6,400
        s = await stack.enter_async_context(aiohttp.ClientSession())
        stats = {w["id"]: w for w in (await get_stats(s, base))["workers"]}
        assert stats[nowhere]["kind"] == "unreachable" and not stats[nowhere]["available"]
        assert stats[urls[0]]["device_capacity_blocks"] == 64 and stats[urls[1]]["index_device_blocks"] == 640

        page = await stack.enter_async_context(open_dashboard(browser, base))
        await wait_polls(page, 2)

        async def device_share(url: str) -> float:
            bar = page.locator(f'#workers tbody tr[data-worker="{url}"] [data-tier="device"]')
            return float(await bar.get_attribute("data-value"))

        assert await device_share(urls[0]) == 1.0
        assert await device_share(urls[1]) == pytest.approx(0.1)
        row = page.locator(f'#workers tbody tr[data-worker="{nowhere}"]')
        assert await row.locator("td").nth(1).inner_text() == "unreachable"
        assert await row.locator("td").nth(2).inner_text() == "down"
        assert "capacity not reported" in await row.locator("td").nth(8).inner_text()
