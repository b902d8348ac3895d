import math

import pytest

from cache.planning.load_profile import MAX_DECODE_POINTS, DecodePoint, KVLoadCost, LoadProfile
from cache.wire.tiers import Tier


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
