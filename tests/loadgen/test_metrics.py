"""Every metric on hand-made event timelines, checked against the SGLang/vLLM formulas."""

from __future__ import annotations

import numpy as np
import pytest

from cache.api.replies import reply_usage
from loadgen.client import RequestRecord, _read_usage
from loadgen.metrics import SLO, compute_metrics, summarize, tpot_s
from loadgen.report import format_run_table


def record(request_id: int, chunks: list[tuple[float, bool]], end: float, **fields) -> RequestRecord:
    r = RequestRecord(request_id=request_id, success=fields.pop("success", True), **fields)
    r.chunk_offsets_s = [t for t, _ in chunks]
    r.chunk_has_content = [c for _, c in chunks]
    r.end_offset_s = end
    return r


@pytest.fixture
def timeline() -> list[RequestRecord]:
    # A: role-only chunk first (empty), 3 content chunks, a usage chunk, [DONE] at 0.27 s
    a = record(
        0,
        [(0.05, False), (0.10, True), (0.15, True), (0.25, True), (0.26, False)],
        0.27,
        usage_output_tokens=3,
        prompt_tokens=100,
        cached_tokens=64,
        scheduled_s=0.0,
        dispatch_s=0.002,
    )
    # B: a single output token
    b = record(
        1,
        [(0.20, True), (0.205, False)],
        0.21,
        usage_output_tokens=1,
        prompt_tokens=50,
        cached_tokens=0,
        scheduled_s=0.5,
        dispatch_s=0.504,
    )
    failed = record(2, [], 0.01, success=False, http_status=500, error="HTTP 500: boom", prompt_tokens=None)
    warm = record(
        3,
        [(0.01, True), (0.02, True)],
        0.03,
        warmup=True,
        usage_output_tokens=2,
        prompt_tokens=10,
        cached_tokens=10,
    )
    return [a, b, failed, warm]


def test_ttft_skips_empty_chunks_and_itl_and_latency(timeline):
    a, b = timeline[0], timeline[1]
    assert a.ttft_s == pytest.approx(0.10)
    assert a.itl_s == pytest.approx([0.05, 0.10])  # the usage chunk after the last content is no gap
    assert a.latency_s == pytest.approx(0.27)
    assert tpot_s(a) == pytest.approx((0.27 - 0.10) / (3 - 1))
    assert tpot_s(b) is None  # one output token: no TPOT


def test_aggregates(timeline):
    m = compute_metrics(timeline, duration_s=2.0, percentiles=(90, 99))
    assert (m["num_requests"], m["completed"], m["failed"]) == (3, 2, 1)  # warm-up excluded
    assert m["total_input_tokens"] == 150
    assert m["total_output_tokens"] == 4
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["input_throughput"] == pytest.approx(75.0)
    assert m["output_throughput"] == pytest.approx(2.0)
    assert m["total_token_throughput"] == pytest.approx(77.0)
    assert m["concurrency"] == pytest.approx((0.27 + 0.21) / 2.0)
    assert m["mean_ttft_ms"] == pytest.approx(150.0)
    assert m["median_ttft_ms"] == pytest.approx(150.0)
    assert m["p99_ttft_ms"] == pytest.approx(np.percentile([100.0, 200.0], 99))  # linear: 199
    assert m["p90_ttft_ms"] == pytest.approx(190.0)
    assert m["std_ttft_ms"] == pytest.approx(50.0)
    # TPOT only over A; ITL pooled over all chunk gaps of all requests
    assert m["mean_tpot_ms"] == pytest.approx(85.0)
    assert m["p99_tpot_ms"] == pytest.approx(85.0)
    assert m["mean_itl_ms"] == pytest.approx(75.0)
    assert m["max_itl_ms"] == pytest.approx(100.0)
    assert m["mean_e2el_ms"] == pytest.approx(240.0)
    assert m["mean_e2e_latency_ms"] == m["mean_e2el_ms"]
    assert m["cache_hit_rate"] == pytest.approx(64 / 150)
    assert m["cached_tokens_reported"] == 2
    assert m["mean_lateness_ms"] == pytest.approx(3.0)
    assert m["p99_lateness_ms"] == pytest.approx(np.percentile([2.0, 4.0], 99))
    assert m["goodput"] is None
    assert m["first_errors"] == ["HTTP 500: boom"]


@pytest.mark.parametrize(
    ("slo", "good"),
    [
        (["ttft:150"], 1),  # A (100 ms) meets it, B (200 ms) doesn't
        (["tpot:80"], 1),  # A's TPOT is 85 ms; B has one token, so TPOT 0 for goodput (vLLM)
        (["ttft:150", "tpot:90"], 1),
        (["ttft:300 tpot:90"], 2),
        (["e2el:250"], 1),
        (["ttft:50"], 0),
    ],
)
def test_goodput(timeline, slo, good):
    m = compute_metrics(timeline, duration_s=2.0, slo=SLO.parse(slo))
    assert m["good_requests"] == good
    assert m["goodput"] == pytest.approx(good / 2.0)
    assert m["request_goodput"] == m["goodput"]


def test_slo_parse_errors():
    assert SLO.parse(["ttft:500", "tpot:50"]) == SLO(500.0, 50.0, None)
    for bad in (["ttft"], ["latency:5"], ["ttft:-1"]):
        with pytest.raises(ValueError):
            SLO.parse(bad)


def test_output_tokens_without_usage_counts_content_chunks():
    r = record(0, [(0.1, True), (0.2, False), (0.3, True)], 0.3)
    assert r.output_tokens == 2


def test_empty_lists_give_zero_like_bench_serving():
    out = summarize("ttft", [], (99,))
    assert out == {"mean_ttft_ms": 0.0, "median_ttft_ms": 0.0, "std_ttft_ms": 0.0, "p99_ttft_ms": 0.0}
    m = compute_metrics([], duration_s=1.0)
    assert m["completed"] == 0 and m["cache_hit_rate"] is None and m["mean_lateness_ms"] is None


def test_non_integer_percentile_key():
    assert "p99.9_itl_ms" in summarize("itl", [0.1], (99.9,))


def test_recomputed_and_fetched_tokens(timeline):
    """Recomputed = prompt - cached over requests with usage; fetched (KV from a peer worker, our engine's
    usage) only when a worker reported it: None otherwise, never a made-up 0."""
    m = compute_metrics(timeline, duration_s=2.0)
    assert m["total_recomputed_tokens"] == (100 - 64) + 50  # the warm-up and the failure excluded
    assert m["total_kv_fetched_tokens"] is None and m["kv_fetches_reported"] == 0
    assert table_rows(m)["Fetched prompt tokens (KV from a peer)"] == "n/a"
    reply = {
        "usage": {
            "prompt_tokens": 100,
            "prompt_tokens_details": {"cached_tokens": 64, "kv_fetched_tokens": 48},
        }
    }
    _read_usage(timeline[0], reply_usage(reply))
    m = compute_metrics(timeline, duration_s=2.0)
    assert m["total_kv_fetched_tokens"] == 48 and m["kv_fetches_reported"] == 1
    assert timeline[0].to_json()["kv_fetched_tokens"] == 48
    rows = table_rows(m)
    assert (rows["Fetched prompt tokens (KV from a peer)"], rows["Recomputed prompt tokens"]) == ("48", "86")


def table_rows(metrics: dict) -> dict[str, str]:
    lines = format_run_table("run", metrics).splitlines()
    return {line.split(":")[0]: line.rsplit(" ", 1)[1] for line in lines if ":" in line}
