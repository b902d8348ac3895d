"""Fetched vs recomputed tokens and fetch time in the gateway's figures (gateway/metrics.py, /stats, /metrics,
the dashboard's figures): tokens a worker fetched from a peer are counted as their own kind, never as an
index misprediction. Records first, then the gateway against stub workers whose usage reports a fetch."""

from __future__ import annotations

from typing import Any

import pytest

from cache.api.replies import KVFetch
from cache.api.requests import chat_prompt_ids
from cache.index.ops import StoredOp
from cache.prompt.tokenizer import Tokenizer
from cache.wire.hashing import block_hashes, namespace_seed
from gateway.dashboard import figures, own_totals
from gateway.metrics import GatewayMetrics, RequestRecord
from tests.gateway.test_dispatch import CHAT
from tests.gateway.test_fetch_plans import chat_body, gateway_over_engines


def request(
    prompt: int,
    cached: int | None,
    predicted: int,
    planned: int = 0,
    fetch: KVFetch | None = None,
    status: int = 200,
) -> RequestRecord:
    return RequestRecord(
        time=0.0,
        request_id="r",
        tenant="default",
        worker="http://b",
        policy="cache_aware",
        reason="load_bound",
        status=status,
        stream=False,
        prompt_tokens=prompt,
        predicted_cached_tokens=predicted,
        cached_tokens=cached,
        completion_tokens=3,
        ttft_s=None,
        latency_s=0.5,
        fetch_source="http://a" if planned else None,
        fetch_planned_tokens=planned,
        kv_fetch=fetch,
    )


def test_fetched_tokens_are_their_own_kind_beside_the_prediction() -> None:
    metrics = GatewayMetrics(recent=10)
    metrics.record(request(1000, 960, predicted=400, planned=560, fetch=KVFetch(560, 0.030)))
    metrics.record(request(1000, 400, predicted=400))  # no plan: the index was right
    s = metrics.summary()
    assert s["cached_tokens"] == 1360 and s["kv_fetched_tokens"] == 560
    assert s["kv_fetch_recomputed_tokens"] == 0
    # cached here + fetched + computed = every reported prompt token
    assert s["prompt_tokens_by_source"] == {"cached": 800, "fetched": 560, "computed": 640}
    # What the index promised matches what was cached locally; the fetched share is apart.
    assert s["hit_rate_predicted"] == pytest.approx(800 / 2000)
    assert s["hit_rate_actual"] - s["hit_rate_fetched"] == pytest.approx(s["hit_rate_predicted"])
    assert s["kv_fetch_p50_s"] == pytest.approx(0.030) and s["kv_fetch_samples"] == 1
    assert metrics.recent_requests()[0]["fetched_tokens"] == 560
    assert metrics.recent_requests()[0]["kv_fetch"] == {"tokens": 560, "seconds": 0.030}


def test_a_fetch_that_fell_short_leaves_its_tokens_to_recompute() -> None:
    metrics = GatewayMetrics(recent=10)
    metrics.record(request(1000, 200, predicted=0, planned=560, fetch=KVFetch(200, 0.5)))  # source had less
    metrics.record(request(1000, 0, predicted=0, planned=560, fetch=KVFetch(0, 2.0)))  # source gone
    s = metrics.summary()
    assert s["kv_fetched_tokens"] == 200 and s["kv_fetch_recomputed_tokens"] == 360 + 560
    assert s["prompt_tokens_by_source"] == {"cached": 0, "fetched": 200, "computed": 1800}
    assert s["kv_fetch_samples"] == 2  # a failed fetch took its time too


def test_a_worker_that_does_not_report_its_fetch_is_credited_with_its_surplus() -> None:
    """What the worker cached beyond the index's prediction, up to the plan, came from the peer."""
    assert request(1000, 960, predicted=400, planned=560).fetched_tokens() == 560
    assert request(1000, 700, predicted=400, planned=560).fetched_tokens() == 300
    assert request(1000, 300, predicted=400, planned=560).fetched_tokens() == 0  # it even lost some
    assert request(1000, 960, predicted=400).fetched_tokens() == 0  # no plan: nothing was fetched
    assert request(1000, None, predicted=400, planned=560).fetched_tokens() == 0  # no usage: unknown
    # A report is believed up to the cached tokens, which it is part of.
    assert request(1000, 100, predicted=0, planned=560, fetch=KVFetch(560)).fetched_tokens() == 100


def test_requests_without_usage_or_that_failed_count_nothing() -> None:
    metrics = GatewayMetrics(recent=10)
    metrics.record(request(1000, None, predicted=0, planned=560, fetch=KVFetch(560, 0.1)))
    metrics.record(request(1000, 960, predicted=0, planned=560, fetch=KVFetch(560, 0.1), status=500))
    s = metrics.summary()
    assert s["kv_fetched_tokens"] == s["kv_fetch_recomputed_tokens"] == 0
    assert s["prompt_tokens_by_source"] == {"cached": 0, "fetched": 0, "computed": 0}


def test_the_cluster_figures_carry_the_same_kinds() -> None:
    metrics = GatewayMetrics(recent=10)
    metrics.record(request(1000, 960, predicted=400, planned=560, fetch=KVFetch(560, 0.030)))
    cluster = figures(own_totals(metrics))  # what every replica pushes and reads back
    assert cluster["prompt_tokens_by_source"] == metrics.summary()["prompt_tokens_by_source"]
    assert cluster["kv_fetched_tokens"] == 560
    assert 0.025 < cluster["kv_fetch_p50_s"] <= 0.05  # estimated inside its histogram bucket


async def test_the_gateway_shows_what_its_workers_report(
    tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stub engines answer with our engine's usage fields; /stats and /metrics show them."""
    body = chat_body()
    async with gateway_over_engines(tokenizer) as (base, state, stubs, session):
        ids = chat_prompt_ids(tokenizer, body["messages"])
        planned = (len(ids) - 1) // 16 * 16
        usage: dict[str, Any] = {
            "prompt_tokens": len(ids),
            "completion_tokens": 3,
            "total_tokens": len(ids) + 3,
            "prompt_tokens_details": {
                "cached_tokens": planned,
                "kv_fetched_tokens": planned,
                "kv_fetch_seconds": 0.02,
            },
        }
        monkeypatch.setattr("tests.gateway.test_dispatch.USAGE", usage)
        first, _ = list(state.pool)
        await state.store.append(
            StoredOp(first.worker_id, None, block_hashes(ids, 16, seed=namespace_seed("stub-model")))
        )
        first.external_load = 5  # the second worker gets the request, with a plan naming the first
        for stream in (False, True):
            async with session.post(base + CHAT, json={**body, "stream": stream}) as r:
                assert r.status == 200, await r.text()
                await r.read()
        assert "kv_fetch_plan" in stubs[1].bodies[0]
        async with session.get(base + "/stats") as r:
            stats = await r.json()
        totals = stats["totals"]
        # The second request found the prefix claimed on b: no plan; the stub reports a fetch anyway,
        # and what a worker reports is what the gateway counts (up to its cached tokens).
        assert totals["kv_fetch_plans"] == {"attached": 1}
        assert totals["kv_fetched_tokens"] == 2 * planned
        assert totals["prompt_tokens_by_source"]["fetched"] == 2 * planned
        assert totals["kv_fetch_samples"] == 2 and totals["kv_fetch_p50_s"] == pytest.approx(0.02)
        assert stats["recent"][0]["fetched_tokens"] == planned
        async with session.get(base + "/metrics") as r:
            text = await r.text()
        assert f"prefixgate_kv_fetched_tokens_total {float(2 * planned)}" in text
        assert "prefixgate_kv_fetch_recomputed_tokens_total 0.0" in text
        assert "prefixgate_kv_fetch_seconds_count 2.0" in text
