"""The figures a worker keeps of its KV fetches (cache/planning/fetch_cost.py): what the gateway weighs a
fetch plan with, and their wire form, which the gateway reads from workers it does not trust."""

import math

import pytest

from cache.planning.fetch_cost import FetchCost, FetchCostMeter


def test_a_fetch_splits_into_a_fixed_cost_and_bytes_over_throughput() -> None:
    meter = FetchCostMeter(alpha=0.5)
    assert meter.snapshot() == FetchCost() and not meter.snapshot().measured
    meter.observe(num_bytes=10_000_000, transfer_s=0.010, total_s=0.012)  # 1 GB/s, 2 ms round trip
    cost = meter.snapshot()
    assert cost.bytes_per_s == pytest.approx(1e9) and cost.round_trip_s == pytest.approx(0.002)
    assert cost.fetches == 1 and cost.measured
    assert cost.seconds(5_000_000) == pytest.approx(0.002 + 0.005)
    assert meter.snapshot() is cost  # unchanged: the same immutable snapshot


def test_the_first_samples_are_a_running_mean_then_an_ewma() -> None:
    """A cold first fetch (a handshake) washes out as 1/n instead of weighing alpha forever."""
    meter = FetchCostMeter(alpha=0.25)
    meter.observe(1_000_000, 0.004, 0.104)  # cold: 100 ms fixed
    for _ in range(3):
        meter.observe(1_000_000, 0.001, 0.002)  # warm: 1 ms fixed, 1 GB/s
    assert meter.snapshot().round_trip_s == pytest.approx((0.100 + 3 * 0.001) / 4)
    assert 1 / meter.snapshot().bytes_per_s == pytest.approx((4e-9 + 3 * 1e-9) / 4)
    before = meter.snapshot().round_trip_s
    meter.observe(1_000_000, 0.001, 0.002)  # the fifth: an EWMA with alpha 0.25 from here on
    assert meter.snapshot().round_trip_s == pytest.approx(before + 0.25 * (0.001 - before))
    assert meter.snapshot().fetches == 5


def test_nonsense_observations_are_ignored() -> None:
    meter = FetchCostMeter()
    for args in [(0, 0.1, 0.2), (100, 0.0, 0.1), (100, 0.2, 0.1), (100, math.nan, 1.0), (100, 0.1, math.inf)]:
        meter.observe(*args)
    assert meter.snapshot() == FetchCost()


def test_json_round_trip() -> None:
    cost = FetchCost(1.5e9, 0.003, 7)
    assert FetchCost.from_json(cost.to_json()) == cost
    assert FetchCost.from_json(FetchCost().to_json()) == FetchCost()
    assert FetchCost.from_json({"bytes_per_s": 10, "round_trip_s": 0}) == FetchCost(10.0, 0.0, 0)


@pytest.mark.parametrize(
    "hostile",
    [
        None,
        [],
        "fast",
        {"bytes_per_s": 0, "round_trip_s": 0.001},  # no throughput: every fetch would take forever
        {"bytes_per_s": -1, "round_trip_s": 0.001},
        {"bytes_per_s": 1e9, "round_trip_s": -0.001},
        {"bytes_per_s": math.inf, "round_trip_s": 0.001},
        {"bytes_per_s": 1e9, "round_trip_s": math.nan},
        {"bytes_per_s": True, "round_trip_s": 0.001},
        {"bytes_per_s": "1e9", "round_trip_s": 0.001},
        {"bytes_per_s": 1e9},  # one figure without the other
        {"round_trip_s": 0.001},
        {"bytes_per_s": 1e9, "round_trip_s": 0.001, "fetches": -1},
        {"bytes_per_s": 1e9, "round_trip_s": 0.001, "fetches": 1.5},
    ],
)
def test_hostile_figures_read_as_none(hostile: object) -> None:
    assert FetchCost.from_json(hostile) is None
