import math

import pytest

from cache.planning.load_profile import MAX_DECODE_POINTS, DecodePoint, KVLoadCost, LoadProfile, StepProfiler
from cache.wire.tiers import Tier


def test_prefill_and_decode_steps_land_in_their_own_figures() -> None:
    profiler = StepProfiler(max_batch=64, alpha=0.5)
    profiler.observe(prefill_tokens=1000, decode_rows=0, seconds=0.5)  # 2000 tok/s
    profiler.observe(prefill_tokens=480, decode_rows=20, seconds=0.125)  # 4000 tok/s, decodes count
    profiler.observe(prefill_tokens=8, decode_rows=3, seconds=1.0)  # too small to say anything
    profiler.observe(prefill_tokens=0, decode_rows=1, seconds=0.010)
    profiler.observe(prefill_tokens=0, decode_rows=5, seconds=0.020)
    profiler.observe(prefill_tokens=0, decode_rows=7, seconds=0.030)  # same bucket (4-7) as 5
    profile = profiler.snapshot()
    assert profile.prefill_tokens_per_s == pytest.approx(3000)
    assert profile.decode == (DecodePoint(1, 0.010, 1), DecodePoint(6, 0.025, 2))
    assert profile.max_batch == 64
    assert profiler.snapshot() is profile  # unchanged: the same immutable snapshot


def test_json_round_trip() -> None:
    profile = LoadProfile(1234.5, (DecodePoint(1, 0.01, 3), DecodePoint(9.5, 0.02, 4)), 32)
    assert LoadProfile.from_json(profile.to_json()) == profile
    assert LoadProfile.from_json(LoadProfile().to_json()) == LoadProfile()
    assert not LoadProfile().measured
    tiered = LoadProfile(kv_load=KVLoadCost(1e-3, 1e-5, None, 64))
    assert LoadProfile.from_json(tiered.to_json()) == tiered
    assert LoadProfile.from_json({"kv_load": {"host_s_per_token": 2}}) == LoadProfile(
        kv_load=KVLoadCost(host_s_per_token=2.0)
    )


def test_a_lower_tier_hit_saves_what_loading_saves_over_recomputing() -> None:
    cost = KVLoadCost(prefill_s_per_token=1e-3, host_s_per_token=1e-4, disk_s_per_token=4e-4)
    assert cost.saved_fraction(Tier.DEVICE) == 1.0
    assert cost.saved_fraction(Tier.HOST) == pytest.approx(0.9)
    assert cost.saved_fraction(Tier.DISK) == pytest.approx(0.6)
    slow_disk = KVLoadCost(prefill_s_per_token=1e-3, disk_s_per_token=5e-3)  # the engine recomputes
    assert slow_disk.saved_fraction(Tier.DISK) == 0.0
    assert slow_disk.saved_fraction(Tier.HOST) is None  # not measured yet
    assert KVLoadCost(host_s_per_token=1e-4).saved_fraction(Tier.HOST) is None  # no prefill rate yet


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {"prefill_tokens_per_s": -1},
        {"prefill_tokens_per_s": math.inf},
        {"prefill_tokens_per_s": "fast"},
        {"prefill_tokens_per_s": True},
        {"max_batch": 0},
        {"max_batch": 2.5},
        {"decode": {"batch": 1}},
        {"decode": [1, 2]},
        {"decode": [{"batch": 1, "step_s": 0}]},
        {"decode": [{"batch": math.nan, "step_s": 0.1}]},
        {"decode": [{"batch": 1, "step_s": 0.1, "steps": -1}]},
        {"decode": [{"batch": 1, "step_s": 0.1}] * (MAX_DECODE_POINTS + 1)},
        {"kv_load": []},
        {"kv_load": {"host_s_per_token": -1e-5}},
        {"kv_load": {"disk_s_per_token": math.nan}},
        {"kv_load": {"prefill_s_per_token": "slow"}},
        {"kv_load": {"min_load_tokens": -1}},
        {"kv_load": {"min_load_tokens": 1.5}},
    ],
)
def test_a_worker_reporting_nonsense_has_no_profile(data) -> None:
    assert LoadProfile.from_json(data) is None
