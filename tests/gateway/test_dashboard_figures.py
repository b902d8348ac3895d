"""Dashboard figures without HTTP: counter deltas, cluster aggregation, bucket quantiles, history."""

from __future__ import annotations

import asyncio

import pytest

from cache.index.radix_index import IndexStats
from gateway.dashboard import (
    STALE_AFTER_S,
    Dashboard,
    bucket_quantile,
    counter_deltas,
    drop_dashboard_counters,
    figures,
    own_totals,
    split_counters,
)
from gateway.metrics import HISTOGRAM_BOUNDS, GatewayMetrics, RequestRecord, bucket_key
from gateway.shared_state import LocalSharedState
from gateway.state import run_periodically


def record(
    metrics: GatewayMetrics, prompt: int, cached: int | None, predicted: int, ttft: float = 0.2
) -> None:
    metrics.record(
        RequestRecord(
            time=0.0,
            request_id="r",
            tenant="default",
            worker="http://w",
            policy="cache_aware",
            reason="cache_hit" if predicted else "least_load",
            status=200,
            stream=True,
            prompt_tokens=prompt,
            predicted_cached_tokens=predicted,
            cached_tokens=cached,
            completion_tokens=5,
            ttft_s=ttft,
            latency_s=ttft + 0.4,
            tpot_s=RequestRecord.time_per_output_token(ttft, ttft + 0.4, 5),
        ),
        inter_token_s=[0.1, 0.1, 0.1, 0.1],
    )
    metrics.decision("cache_aware", "cache_hit" if predicted else "least_load", "http://w")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_tpot_is_decode_time_per_token_after_the_first() -> None:
    assert RequestRecord.time_per_output_token(0.5, 2.5, 5) == pytest.approx(0.5)
    assert RequestRecord.time_per_output_token(0.5, 2.5, 1) is None  # one token: no decode interval
    assert RequestRecord.time_per_output_token(None, 2.5, 5) is None  # not streamed: no first token time


def test_counter_deltas_send_only_the_increase_and_a_heartbeat() -> None:
    first = counter_deltas("a", {"requests": 2, "cached_tokens": 10}, {})
    assert first == {
        "dash|cluster|requests": 2,
        "dash|replica|a|requests": 2,
        "dash|cluster|cached_tokens": 10,
        "dash|replica|a|cached_tokens": 10,
        "dash|replica|a|heartbeat": 1,
    }
    assert list(first)[-3:-1] == ["dash|cluster|requests", "dash|replica|a|requests"]  # sent last
    again = counter_deltas("a", {"requests": 3, "cached_tokens": 10}, {"requests": 2, "cached_tokens": 10})
    assert again == {"dash|cluster|requests": 1, "dash|replica|a|requests": 1, "dash|replica|a|heartbeat": 1}


def test_index_evictions_count_only_growth_across_index_replacements() -> None:
    metrics = GatewayMetrics(recent=4)
    value = lambda: metrics.registry.get_sample_value("prefixgate_index_evictions_total")  # noqa: E731
    for evictions, expected in (
        (5, 5),
        (8, 8),
        (2, 10),
        (2, 10),
        (3, 11),
    ):  # 2: a snapshot replaced the index
        metrics.observe_index(IndexStats(blocks=100, evictions=evictions, approx_entries=7, per_worker={}))
        assert value() == expected
    assert metrics.registry.get_sample_value("prefixgate_index_size", {"kind": "approximate"}) == 7


def test_split_counters_ignores_other_counters() -> None:
    counters = {
        "requests": 7,
        "dash|cluster|requests": 3,
        "dash|replica|a|requests": 1,
        "dash|replica|b|x|y": 2,
    }
    cluster, replicas = split_counters(counters)
    assert cluster == {"requests": 3}
    assert replicas == {"a": {"requests": 1}, "b": {"x|y": 2}}
    assert drop_dashboard_counters(counters) == {"requests": 7}


def test_bucket_quantile_interpolates_like_histogram_quantile() -> None:
    bounds = HISTOGRAM_BOUNDS["ttft"]  # (0.01, 0.025, 0.05, 0.1, 0.25, ...)
    counts = {bucket_key("ttft", 0.07): 10, bucket_key("ttft", 0.2): 10}
    assert bucket_key("ttft", 0.1) == "ttft_le_3"  # le: 0.1 belongs to the 0.1 bucket
    assert bucket_quantile(counts, "ttft", 0.5) == pytest.approx(0.1)  # the top of the first bucket
    assert bucket_quantile(counts, "ttft", 0.75) == pytest.approx(0.175)  # half way into (0.1, 0.25]
    assert bucket_quantile(counts, "ttft", 0.25) == pytest.approx(0.075)
    assert bucket_quantile({bucket_key("ttft", 1e9): 1}, "ttft", 0.99) == bounds[-1]  # +Inf bucket
    assert bucket_quantile({}, "ttft", 0.5) is None


async def test_two_replicas_sum_into_the_cluster_figures() -> None:
    store, clock = LocalSharedState(), Clock()  # one store both replicas write to, as Redis would be
    metrics_a, metrics_b = GatewayMetrics(50), GatewayMetrics(50)
    a = Dashboard(metrics_a, store, "a", shared=True, in_flight=lambda: 0, clock=clock)
    b = Dashboard(metrics_b, store, "b", shared=True, in_flight=lambda: 0, clock=clock)
    record(metrics_a, prompt=100, cached=80, predicted=96)
    record(metrics_a, prompt=100, cached=None, predicted=0)  # a worker that reports no usage
    record(metrics_b, prompt=300, cached=150, predicted=160, ttft=3.0)
    await a.tick()
    await b.tick()
    clock.now += 1
    record(metrics_b, prompt=100, cached=0, predicted=0, ttft=3.0)
    await a.tick()
    await b.tick()  # b pushed its second request; a reads the counters on its next tick
    clock.now += 1
    await a.tick()

    assert a.cluster is not None
    totals = a.cluster["totals"]
    assert totals["requests"] == 4
    assert totals["prompt_tokens"] == 600
    # actual: cached / prompt tokens of the requests that reported usage (100 + 300 + 100)
    assert totals["hit_rate_actual"] == pytest.approx((80 + 150 + 0) / 500)
    assert totals["hit_rate_predicted"] == pytest.approx((96 + 160) / 600)
    assert totals["prompt_tokens_saved"] == 230
    assert totals["routing"] == {"cache_aware/cache_hit": 2, "cache_aware/least_load": 2}
    assert 2.0 < totals["ttft_p90_s"] <= 4.0  # b's 3 s requests, estimated inside the (2, 4] bucket
    assert totals["tpot_p50_s"] is not None
    rows = {r["id"]: r for r in a.cluster["replicas"]}
    assert rows["a"]["requests"] == 2 and rows["b"]["requests"] == 2
    assert rows["a"]["self"] and rows["a"]["live"] and rows["b"]["live"]
    # each replica's own summary agrees with its slice of the cluster
    assert rows["b"]["hit_rate_actual"] == pytest.approx(metrics_b.summary()["hit_rate_actual"])

    clock.now += STALE_AFTER_S + 1  # b stops pushing
    await a.tick()
    rows = {r["id"]: r for r in a.cluster["replicas"]}
    assert rows["a"]["live"] and not rows["b"]["live"]
    assert a.cluster["live_replicas"] == 1
    assert a.cluster["totals"]["requests"] == 4  # its history stays in the sums


async def test_history_samples_have_windowed_rates_and_are_served_since_a_time() -> None:
    clock, metrics = Clock(), GatewayMetrics(50)
    dash = Dashboard(metrics, LocalSharedState(), "solo", shared=False, in_flight=lambda: 3, clock=clock)
    await dash.tick()
    first = dash.history[-1]
    assert first["requests"] == 0 and first["hit_rate_actual"] is None and first["in_flight"] == 3
    assert "cluster" not in first and dash.cluster is None
    for _ in range(3):
        clock.now += 1
        record(metrics, prompt=100, cached=50, predicted=75)
        await dash.tick()
    last = dash.history[-1]
    assert last["requests"] == 3
    assert last["hit_rate_actual"] == pytest.approx(0.5)
    assert last["hit_rate_predicted"] == pytest.approx(0.75)
    assert last["saved_tokens_per_s"] == pytest.approx(150 / 3)
    assert last["requests_per_s"] == pytest.approx(1.0)
    assert [s["t"] for s in dash.since(1_001.5)] == [1_002.0, 1_003.0]
    assert own_totals(metrics)["routing|cache_aware/cache_hit"] == 3
    assert figures(own_totals(metrics))["hit_rate_actual"] == pytest.approx(
        metrics.summary()["hit_rate_actual"]
    )


class SwallowsCancel(LocalSharedState):
    """A store whose counter read swallows one cancellation, as redis-py can (redis/redis-py#2028)."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = asyncio.Event()
        self.swallowed = 0

    async def counters(self) -> dict[str, int]:
        self.reading.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.swallowed += 1
        return await super().counters()


async def test_sampling_loop_stops_on_its_flag_even_if_a_cancel_was_swallowed() -> None:
    store, stop = SwallowsCancel(), asyncio.Event()
    dashboard = Dashboard(GatewayMetrics(4), store, "a", shared=True, in_flight=lambda: 0)
    task = asyncio.create_task(
        run_periodically(stop, dashboard.seconds_to_next_sample, dashboard.tick, "sample")
    )
    await asyncio.wait_for(store.reading.wait(), 5)
    stop.set()
    task.cancel()  # lands inside the counter read and is swallowed there
    done, _ = await asyncio.wait({task}, timeout=5)
    assert store.swallowed == 1
    assert done == {task}, "the loop went on sampling after its cancel was swallowed"


async def test_one_replicas_percentiles_are_exact_and_count_only_requests_that_have_them() -> None:
    # Histogram interpolation would put p99 inside the 0.075-0.1 s bucket's upper part or beyond; the
    # recorded values say the slowest TTFT was 0.101 s, and the sample must not claim more.
    clock, metrics = Clock(), GatewayMetrics(50)
    dash = Dashboard(metrics, LocalSharedState(), "solo", shared=False, in_flight=lambda: 0, clock=clock)
    await dash.tick()
    clock.now += 1
    for ttft in (0.010, 0.020, 0.101):
        record(metrics, prompt=10, cached=0, predicted=0, ttft=ttft)
    metrics.record(  # a non-streamed request: no TTFT, and it must not be counted as one
        RequestRecord(
            0.0, "n", "default", "http://w", "cache_aware", "least_load", 200, False, 10, 0, 0, 5, None, 0.5
        )
    )
    await dash.tick()
    sample, summary = dash.history[-1], metrics.summary()
    assert sample["ttft_p99_s"] == summary["ttft_p99_s"] == 0.101
    assert sample["ttft_p50_s"] == 0.020
    assert summary["ttft_samples"] == 3 and summary["latency_window"] == 4


async def test_the_hit_rate_chart_and_its_cards_are_over_the_same_requests() -> None:
    """The chart's latest point is the card's figure, on this replica and for the cluster, even when the
    requests span more than a window and the shared counters held history before this replica started
    reading them (a windowed chart showed 88.9% next to a 66.7% card over the same requests)."""
    store, clock = LocalSharedState(), Clock()
    await store.incr("dash|cluster|requests", 1)  # an earlier replica's cold request, long ago
    await store.incr("dash|cluster|prompt_tokens", 100)
    await store.incr("dash|cluster|reported_prompt_tokens", 100)
    metrics = GatewayMetrics(50)
    dash = Dashboard(metrics, store, "a", shared=True, in_flight=lambda: 0, clock=clock)
    record(metrics, prompt=100, cached=0, predicted=0)  # cold
    await dash.tick()
    for _ in range(12):  # past the 10 s window: then only hits
        clock.now += 1
        record(metrics, prompt=100, cached=90, predicted=90)
        await dash.tick()
    sample, card = dash.history[-1], metrics.summary()
    assert sample["hit_rate_actual"] == pytest.approx(card["hit_rate_actual"]) == pytest.approx(1080 / 1300)
    assert sample["hit_rate_predicted"] == pytest.approx(card["hit_rate_predicted"])
    assert dash.cluster is not None
    cluster_card = dash.cluster["totals"]
    assert sample["cluster"]["hit_rate_actual"] == pytest.approx(cluster_card["hit_rate_actual"])
    assert cluster_card["hit_rate_actual"] == pytest.approx(1080 / 1400)  # with the earlier request
    assert sample["cluster"]["hit_rate_predicted"] == pytest.approx(cluster_card["hit_rate_predicted"])
    assert sample["requests_per_s"] == pytest.approx(1.0)  # throughput stays windowed
