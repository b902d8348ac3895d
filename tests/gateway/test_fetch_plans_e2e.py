"""End to end: a real gateway in front of two real engine workers with ``--kv-transfer``. A long prompt
cached on worker A, a session pinned to worker B: the gateway sends the request to B with a fetch plan
naming A, and B pulls the prefix over Mooncake instead of recomputing it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from gateway.launcher import engine_workers
from tests.gateway.conftest import ENGINE_ARGS, GatewayFactory

pytest.importorskip("mooncake.engine", reason="KV transfer needs mooncake-transfer-engine-non-cuda")

pytestmark = pytest.mark.slow  # real engine workers

PROMPT = [1, *[(i * 37) % 30000 + 200 for i in range(599)]]  # 600 token ids: 37 whole pages
FETCHES_OK = 'prefixgate_engine_kv_fetches_total{outcome="ok"}'


@pytest.fixture(scope="module")
def transfer_workers() -> Iterator[list[str]]:
    extra = [*ENGINE_ARGS, "--kv-transfer", "--kv-transfer-buffer-mib", "16"]
    with engine_workers(2, None, extra, timeout=300) as launched:
        yield [w.url for w in launched]


async def post(session: aiohttp.ClientSession, url: str, body: dict, **headers: str) -> dict[str, Any]:
    async with session.post(url, json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as r:
        return await r.json()


async def metric(session: aiohttp.ClientSession, worker: str, sample: str) -> float:
    async with session.get(f"{worker}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_the_chosen_worker_fetches_the_prefix_its_peer_holds(
    transfer_workers: list[str], gateway: GatewayFactory
) -> None:
    async with gateway(transfer_workers) as (base, _), aiohttp.ClientSession() as session:
        stats = await get_json(session, f"{base}/stats")
        assert all(w["kv_transfer"] for w in stats["workers"])  # the probe saw both layouts
        # Pin a session to one worker (B) with a short prompt; the long prompt is then cached on A only.
        short = {"prompt": [1, 2, 3, 4], "max_tokens": 1, "temperature": 0}
        await post(session, f"{base}/v1/completions", short, **{"X-Session-ID": "s1"})
        b = (await get_json(session, f"{base}/stats"))["recent"][-1]["worker"]
        (a,) = [url for url in transfer_workers if url != b]
        cold = await post(
            session, f"{a}/v1/completions", {"prompt": PROMPT, "max_tokens": 1, "temperature": 0}
        )
        assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

        async def index_has_a() -> bool:
            workers = (await get_json(session, f"{base}/stats"))["workers"]
            return any(w["id"] == a and w["index_device_blocks"] >= 36 for w in workers)

        await wait_async(index_has_a, "A's KV events reached the gateway's index")
        fetched_before = await metric(session, b, FETCHES_OK)

        body = {"prompt": [*PROMPT, 901, 902], "max_tokens": 4, "temperature": 0}
        reply = await post(session, f"{base}/v1/completions", body, **{"X-Session-ID": "s1"})

        stats = await get_json(session, f"{base}/stats")
        record = stats["recent"][-1]
        assert record["worker"] == b and record["reason"] == "session"
        assert record["fetch_source"] == a and record["fetch_planned_tokens"] >= 256
        assert stats["totals"]["kv_fetch_plans"].get("attached") == 1
        details = reply["usage"]["prompt_tokens_details"]
        assert details["cached_tokens"] >= record["fetch_planned_tokens"]  # B had nothing of it: all from A
        assert await metric(session, b, FETCHES_OK) == fetched_before + 1
        # Fetched tokens are reported, and counted apart from the index's predictions.
        assert details["kv_fetched_tokens"] == record["fetched_tokens"] == record["fetch_planned_tokens"]
        assert stats["totals"]["kv_fetched_tokens"] == record["fetched_tokens"]
        assert stats["totals"]["prompt_tokens_by_source"]["fetched"] == record["fetched_tokens"]
        assert stats["totals"]["kv_fetch_samples"] == 1 and stats["totals"]["kv_fetch_p50_s"] > 0
        # B measured the fetch before it answered; the gateway reads the figures at each health check.
        cost = (await get_json(session, f"{b}/kv_transfer/info"))["fetch_cost"]
        assert cost["fetches"] == 1 and cost["bytes_per_s"] > 0 and cost["round_trip_s"] >= 0


async def wait_async(condition: Any, what: str, timeout: float = 60) -> None:
    """Poll ``condition`` (a correctness condition, not a timing one) until it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"never became true: {what}")
