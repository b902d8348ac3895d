"""The gateway's P:D advice: the workload from its request records, worker speeds from their
``/load_profile``, shown on /stats and /metrics next to what is deployed. Stub workers on loopback."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cache.planning.load_profile import DecodePoint, LoadProfile
from cache.planning.pd_advice import SLO, Workload, advise
from cache.prompt.tokenizer import Tokenizer
from cache.wire.hashing import HASH_SCHEME
from gateway.config import GatewayConfig
from gateway.metrics import RequestRecord
from gateway.pd_advisor import observed_workload, pooled_profile, uncached_tokens
from gateway.state import STATE
from gateway.workers import Worker
from tests.gateway.conftest import running_gateway
from tests.gateway.test_dashboard_browser import browser, open_dashboard, wait_polls  # noqa: F401

CURVE = ((1, 0.010), (8, 0.020), (32, 0.050), (64, 0.090))
DECODE = LoadProfile(None, tuple(DecodePoint(b, s, 10) for b, s in CURVE), 64)
PREFILL = LoadProfile(8000.0, (), 64)


def record(t: float, prompt: int = 3500, cached: int | None = 500, out: int = 300, **more) -> RequestRecord:
    return RequestRecord(
        time=t,
        request_id="r",
        tenant="default",
        worker="w",
        policy="cache_aware",
        reason="r",
        status=more.pop("status", 200),
        stream=True,
        prompt_tokens=prompt,
        predicted_cached_tokens=more.pop("predicted", 0),
        cached_tokens=cached,
        completion_tokens=out,
        ttft_s=0.1,
        latency_s=1.0,
        **more,
    )


def test_uncached_tokens_count_what_some_worker_computed() -> None:
    assert uncached_tokens(record(0, 1000, 300)) == 700
    assert uncached_tokens(record(0, 1000, None, predicted=100)) == 900  # no usage: the index's view
    # prefilled remotely: the decode worker calls the KV it received cached; what it lacked was computed
    assert uncached_tokens(record(0, 1000, 1000, predicted=200, pd_path="remote")) == 800


def test_workload_over_the_window_the_records_cover() -> None:
    now = 1000.0
    records = [record(now - i, prompt=100 * i, cached=0, out=i) for i in range(1, 31)]
    records.append(record(now - 2, status=500))  # failed requests are not the workload
    workload, n, span = observed_workload(records, now, window_s=20, complete_since=0)
    # the last 20 s hold the records 1..20 s old: prompts 100..2000, outputs 1..20
    assert (n, span) == (20, 20)
    assert workload.request_rate == 1.0
    assert workload.mean_prefill_tokens == 1050 and workload.mean_output_tokens == 10.5
    assert workload.p90_prefill_tokens == 1900
    # records are complete only since 10 s ago (a full ring buffer): the rate is over those 10 s
    workload, n, span = observed_workload(records, now, window_s=20, complete_since=now - 10)
    assert (n, span, workload.request_rate) == (10, 10, 1.0)
    assert observed_workload([], now, 20, 0) is None


def worker(role: str, profile: LoadProfile | None) -> Worker:
    return Worker(url=f"http://{role}", worker_id=role, role=role, load_profile=profile)


def test_each_pool_is_measured_on_workers_of_its_role() -> None:
    mixed = LoadProfile(1000.0, (DecodePoint(1, 0.5, 1),), 8)
    profile, measured = pooled_profile(
        [worker("prefill", PREFILL), worker("decode", DECODE), worker("mixed", mixed)]
    )
    assert measured == 3
    assert profile.prefill_tokens_per_s == 8000 and profile.decode == DECODE.decode
    # only mixed workers: they stand for both; two of them are averaged, weighted by their steps
    other = LoadProfile(3000.0, (DecodePoint(1.5, 0.3, 3),), 16)
    profile, _ = pooled_profile([worker("mixed", mixed), worker("mixed", other), worker("mixed", None)])
    assert profile.prefill_tokens_per_s == 2000
    assert profile.decode == (DecodePoint((1 + 4.5) / 4, (0.5 + 0.9) / 4, 4),)
    assert profile.max_batch == 8


def stub_app(role: str, profile: LoadProfile) -> web.Application:
    """Our engine as the probe sees it: info with its role, health, load, and what it measured."""

    async def server_info(_: web.Request) -> web.Response:
        mode = "null" if role == "mixed" else role
        return web.json_response(
            {
                "served_model_name": "m",
                "page_size": 16,
                "kv_block_hash": HASH_SCHEME,
                "disaggregation_mode": mode,
            }
        )

    async def ok(_: web.Request) -> web.Response:
        return web.Response()

    async def get_load(_: web.Request) -> web.Response:
        return web.json_response([{"num_reqs": 0, "num_waiting_reqs": 0}])

    async def load_profile(_: web.Request) -> web.Response:
        return web.json_response(profile.to_json())

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    app = web.Application()
    app.router.add_get("/get_server_info", server_info)
    app.router.add_get("/health", ok)
    app.router.add_get("/get_load", get_load)
    app.router.add_get("/load_profile", load_profile)
    app.router.add_get("/v1/models", models)
    return app


@contextlib.asynccontextmanager
async def stub_workers(*specs: tuple[str, LoadProfile]) -> AsyncIterator[list[str]]:
    async with contextlib.AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(TestServer(stub_app(role, p), host="127.0.0.1", port=0))
            for role, p in specs
        ]
        yield [str(s.make_url("")).rstrip("/") for s in servers]


@contextlib.asynccontextmanager
async def advised_gateway(tokenizer: Tokenizer) -> AsyncIterator[tuple[str, web.Application]]:
    """A gateway over one prefill and one decode stub worker that has served 600 requests in the last
    minute (10/s), each with 3000 uncached prompt tokens and 300 output tokens."""
    async with stub_workers(("prefill", PREFILL), ("decode", DECODE)) as urls:
        config = GatewayConfig(
            workers=tuple(urls), recent_requests=1000, ttft_slo_ms=1000, itl_slo_ms=50, health_interval_s=60
        )
        async with running_gateway(config, tokenizer) as (base, app):
            state = app[STATE]
            await state.pool.check_all()  # the periodic probe reads each worker's /load_profile
            now = time.time()
            state.metrics.started = now - 60  # as if it had served for a minute
            for i in range(600):
                state.metrics.record(record(now - 0.09 * i))
            yield base, app


async def test_stats_and_metrics_show_the_advice_next_to_what_is_deployed(tokenizer: Tokenizer) -> None:
    async with advised_gateway(tokenizer) as (base, _), aiohttp.ClientSession() as session:
        async with session.get(base + "/stats") as r:
            advice = (await r.json())["pd_advice"]
        async with session.get(base + "/metrics") as r:
            metrics = await r.text()
    # the numbers of cache/planning's planner table: 4P + 5D = 9 against 10 mixed
    expected = advise(advice_workload(advice), LoadProfile(8000.0, DECODE.decode, 64), SLO(1.0, 0.05))
    assert (expected.prefill_workers, expected.decode_workers, expected.mixed_workers) == (4, 5, 10)
    assert advice["needed"] == {"prefill": 4, "decode": 5, "mixed": 10}
    assert advice["deployed"] == {"prefill": 1, "decode": 1, "mixed": 0}
    assert advice["disaggregation_pays"] is True and advice["reason"] == expected.reason
    assert advice["workload"]["request_rate"] == pytest.approx(10, rel=1e-3)
    assert advice["workload"]["mean_prefill_tokens"] == 3000
    assert advice["slo"] == {"ttft_ms": 1000, "itl_ms": 50}
    assert advice["profile"]["workers_measured"] == 2
    assert advice["figures"]["decode_batch_at_itl"] == 32
    assert 'prefixgate_gateway_pd_advice_workers{role="prefill"} 4.0' in metrics
    assert 'prefixgate_gateway_pd_advice_workers{role="mixed"} 10.0' in metrics
    assert 'prefixgate_gateway_pd_deployed_workers{role="decode"} 1.0' in metrics


@pytest.mark.slow  # a browser
async def test_the_dashboard_card_shows_the_advice(tokenizer: Tokenizer, browser) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    async with advised_gateway(tokenizer) as (base, _), open_dashboard(browser, base) as page:
        await wait_polls(page, 2)
        needed = {
            role: await page.get_attribute(f'#pd-advice tr[data-role="{role}"]', "data-value")
            for role in ("prefill", "decode", "mixed")
        }
        assert needed == {"prefill": "4", "decode": "5", "mixed": "10"}
        assert await page.get_attribute("#pd-advice-reason", "data-pays") == "true"
        assert "disaggregation pays" in await page.inner_text("#pd-advice-reason")


def advice_workload(advice: dict) -> Workload:
    w = advice["workload"]
    return Workload(
        w["request_rate"], w["mean_prefill_tokens"], w["p90_prefill_tokens"], w["mean_output_tokens"]
    )


async def test_without_traffic_or_measurements_the_advice_says_why(tokenizer: Tokenizer) -> None:
    async with stub_workers(("mixed", LoadProfile())) as urls:
        config = GatewayConfig(workers=tuple(urls), health_interval_s=60)
        async with running_gateway(config, tokenizer) as (base, app), aiohttp.ClientSession() as session:
            state = app[STATE]
            await state.pool.check_all()
            async with session.get(base + "/stats") as r:
                first = (await r.json())["pd_advice"]
            state.metrics.record(record(time.time()))
            async with session.get(base + "/stats") as r:
                second = (await r.json())["pd_advice"]
            async with session.get(base + "/metrics") as r:
                metrics = await r.text()
    assert first["needed"] == {"prefill": None, "decode": None, "mixed": None}
    assert "no request served" in first["reason"] and first["deployed"]["mixed"] == 1
    assert "measured" in second["reason"] and second["needed"]["prefill"] is None
    assert 'prefixgate_gateway_pd_advice_workers{role="prefill"} NaN' in metrics
