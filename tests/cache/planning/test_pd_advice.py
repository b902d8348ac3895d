"""The advisor against Dynamo's SLA planner (components/planner ``_compute_replica_requirements``), on
synthetic measurements whose answers are worked out by hand in the comments."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cache.planning.load_profile import DecodePoint, LoadProfile
from cache.planning.pd_advice import (
    SLO,
    Corrections,
    Workload,
    advise,
    largest_batch_within,
    step_time,
)

# Decode step seconds by batch: 10 ms alone, 20 ms at 8, 50 ms at 32, 90 ms at 64.
CURVE = ((1, 0.010), (8, 0.020), (32, 0.050), (64, 0.090))


def profile(prefill_tokens_per_s: float = 8000.0, curve=CURVE, max_batch: int | None = 64) -> LoadProfile:
    return LoadProfile(prefill_tokens_per_s, tuple(DecodePoint(b, s, 10) for b, s in curve), max_batch)


def workload(rate: float, prefill: float, output: float, p90: float | None = None) -> Workload:
    return Workload(rate, prefill, prefill if p90 is None else p90, output)


def planner(num_req, interval, isl, osl, itl, p_corr, d_corr, prefill_thpt, decode_curve):
    """The planner's arithmetic, in its own shape: requests counted over an adjustment interval, one GPU
    per engine, min_endpoint 1; its decode interpolator answered by our measured curve."""
    pred_prefill_throughput = num_req * isl / interval * min(1, p_corr)
    next_num_p = math.ceil(pred_prefill_throughput / prefill_thpt - 1e-9)
    corrected_itl = itl / d_corr if d_corr > 0 else itl
    batch = largest_batch_within(list(decode_curve), corrected_itl, None)
    pred_decode_thpt_per_gpu = batch / step_time(list(decode_curve), batch)
    pred_decode_throughput = num_req * osl / interval
    next_num_d = math.ceil(pred_decode_throughput / pred_decode_thpt_per_gpu - 1e-9)
    return max(next_num_p, 1), max(next_num_d, 1)


@pytest.mark.parametrize(
    ("itl_s", "corrections", "expected"),
    [
        # prefill: 10 req/s x 3000 tokens = 30000 tok/s over 8000 per worker = 3.75 -> 4
        # decode: ITL 50 ms -> batch 32 (50 ms) -> 640 tok/s; 10 x 300 = 3000 tok/s / 640 = 4.69 -> 5
        (0.050, Corrections(), (4, 5)),
        # ITL 35 ms falls between batch 8 (20 ms) and 32 (50 ms): 8 + 24 x 15/30 = 20 -> 20 / 0.035
        # = 571.4 tok/s; 3000 / 571.4 = 5.25 -> 6
        (0.035, Corrections(), (4, 6)),
        # prefill correction 0.5 (TTFT half the expected: cache hits): 30000 x 0.5 / 8000 = 1.875 -> 2
        (0.050, Corrections(prefill=0.5), (2, 5)),
        # a correction above 1 is queueing, which the planner does not scale for: min(1, 1.7) -> 4
        (0.050, Corrections(prefill=1.7), (4, 5)),
        # decode correction 1.25: ITL target 50 / 1.25 = 40 ms -> batch 8 + 24 x 20/30 = 24 -> 600 tok/s;
        # 3000 / 600 = 5 exactly -> 5 (not 6: float noise is not a worker)
        (0.050, Corrections(decode=1.25), (4, 5)),
        # a zero decode correction (no metrics yet) is ignored, as the planner does
        (0.050, Corrections(decode=0.0), (4, 5)),
    ],
)
def test_prefill_and_decode_counts_are_the_planners(itl_s, corrections, expected) -> None:
    advice = advise(workload(10, 3000, 300), profile(), SLO(ttft_s=1.0, itl_s=itl_s), corrections)
    assert (advice.prefill_workers, advice.decode_workers) == expected
    # the same as the planner's own arithmetic over a 60 s interval of 600 requests
    assert expected == planner(
        600, 60, 3000, 300, itl_s, corrections.prefill, corrections.decode, 8000, CURVE
    )


@given(
    rate=st.floats(0.01, 200),
    isl=st.floats(1, 4000),
    osl=st.floats(1, 2000),
    itl=st.floats(0.011, 0.2),
    p_corr=st.floats(0.05, 3),
    d_corr=st.floats(0.2, 1.0),
)
def test_matches_the_planner_on_any_workload(rate, isl, osl, itl, p_corr, d_corr) -> None:
    advice = advise(
        workload(rate, isl, osl), profile(), SLO(ttft_s=10.0, itl_s=itl), Corrections(p_corr, d_corr)
    )
    assert (advice.prefill_workers, advice.decode_workers) == planner(
        rate * 60, 60, isl, osl, itl, p_corr, d_corr, 8000, CURVE
    )


def test_a_long_prompt_over_the_ttft_alone_cannot_be_met_by_adding_workers() -> None:
    # 10000 uncached tokens at 8000 tok/s take 1.25 s alone: no number of workers reaches a 1 s TTFT
    advice = advise(workload(1, 10000, 100), profile(), SLO(ttft_s=1.0, itl_s=0.05))
    assert advice.prefill_workers is None and advice.mixed_workers is None
    assert not advice.disaggregation_pays
    assert "cannot be met by adding workers" in advice.reason and "TTFT" in advice.reason
    assert advice.ttft_alone_s == pytest.approx(1.25)


def test_an_itl_below_a_single_sequence_step_cannot_be_met() -> None:
    advice = advise(workload(1, 1000, 100), profile(), SLO(ttft_s=1.0, itl_s=0.005))
    assert advice.decode_workers is None and "ITL" in advice.reason


def test_p90_prompts_over_the_ttft_are_noted() -> None:
    advice = advise(workload(1, 1000, 100, p90=12000), profile(), SLO(ttft_s=1.0, itl_s=0.05))
    assert advice.prefill_workers == 1
    assert any("p90" in note for note in advice.notes)


def test_light_load_fits_one_mixed_worker() -> None:
    # 1 req/s x 1000 prefill tokens, 100 output tokens, 4000 tok/s prefill. One mixed worker decodes
    # 100 x 0.05 = 5 sequences per 50 ms window; step(5) = 10 + 10 x 4/7 = 15.7 ms, leaving 68.6% of
    # each step to prefill: 2743 tok/s >= 1000, and the mean prompt's TTFT 1000 / 2743 = 0.36 s <= 1 s.
    advice = advise(workload(1, 1000, 100), profile(4000.0), SLO(ttft_s=1.0, itl_s=0.05))
    assert (advice.prefill_workers, advice.decode_workers, advice.mixed_workers) == (1, 1, 1)
    assert advice.mixed_decode_batch == pytest.approx(5.0)
    assert advice.mixed_prefill_share == pytest.approx(1 - (0.010 + 0.010 * 4 / 7) / 0.05)
    assert not advice.disaggregation_pays and "one mixed worker" in advice.reason


def test_short_uncached_prompts_do_not_pay() -> None:
    advice = advise(workload(50, 100, 300), profile(), SLO(ttft_s=1.0, itl_s=0.05))
    assert not advice.disaggregation_pays and "short" in advice.reason


def test_mixed_workers_that_cannot_hold_the_ttft_make_disaggregation_pay() -> None:
    # 3000 tokens at 4000 tok/s: 0.75 s alone, fine for a P worker under a 0.8 s TTFT. A mixed worker
    # gets at most 1 - 10/50 = 80% of a step for prefill (decoding anything): 0.94 s. Mixed cannot.
    advice = advise(workload(1, 3000, 100), profile(4000.0), SLO(ttft_s=0.8, itl_s=0.05))
    assert (advice.prefill_workers, advice.decode_workers, advice.mixed_workers) == (1, 1, None)
    assert advice.disaggregation_pays


def test_heavy_long_prompt_load_needs_fewer_workers_split() -> None:
    # P = 4, D = 5 (see the planner table) -> 9. Mixed: N workers decode 3000 x 0.05 / N each and
    # need N x share x 8000 >= 30000 with share >= 3000 / 8000 = 0.375 (TTFT). N = 9: batch 16.7,
    # step 30.8 ms, share 0.383, 27600 tok/s: short. N = 10: batch 15, step 28.75 ms, share 0.425,
    # 34000 tok/s: enough.
    advice = advise(workload(10, 3000, 300), profile(), SLO(ttft_s=1.0, itl_s=0.05))
    assert (advice.prefill_workers, advice.decode_workers, advice.mixed_workers) == (4, 5, 10)
    assert advice.disaggregation_pays and "9 workers against 10 mixed" in advice.reason


def test_equal_counts_do_not_pay() -> None:
    # 3000 tokens alone in 0.75 s under a 1 s TTFT: one mixed worker (share 0.686 < 0.75) cannot, two
    # can (batch 2.5, step 12.1 ms, share 0.757); P + D is 1 + 1.
    advice = advise(workload(1, 3000, 100), profile(4000.0), SLO(ttft_s=1.0, itl_s=0.05))
    assert (advice.prefill_workers, advice.decode_workers, advice.mixed_workers) == (1, 1, 2)
    assert not advice.disaggregation_pays


def test_nothing_measured_yet() -> None:
    advice = advise(workload(1, 1000, 100), LoadProfile(), SLO(1.0, 0.05))
    assert advice.prefill_workers is None and "measured" in advice.reason


def test_decode_curve_stays_within_what_was_measured() -> None:
    points = [(1, 0.010), (8, 0.020)]
    assert largest_batch_within(points, 1.0, None) == 8  # never extrapolated past the top point
    assert largest_batch_within(points, 1.0, 4) == 4  # nor past the worker's cap
    assert largest_batch_within(points, 0.015, None) == pytest.approx(4.5)
    assert largest_batch_within(points, 0.009, None) is None
    assert largest_batch_within([(3, 0.01)], 0.02, None) == 3
    # a curve that is not monotonic: the largest batch that fits wins, scanning from the top
    assert largest_batch_within([(1, 0.01), (4, 0.03), (8, 0.02)], 0.025, None) == 8
    advice = advise(workload(1, 1000, 100), profile(curve=points, max_batch=64), SLO(1.0, 1.0))
    assert any("measured up to batch 8" in n for n in advice.notes)


def test_zero_load_advises_the_minimum() -> None:
    advice = advise(workload(0, 0, 0), profile(), SLO(1.0, 0.05))
    assert (advice.prefill_workers, advice.decode_workers, advice.mixed_workers) == (1, 1, 1)
    assert advice.to_json()["reason"]
