"""Routing policies in isolation: plain objects, no I/O."""

from __future__ import annotations

import random

import pytest

from cache.index.radix_index import MatchResult
from cache.planning.load_profile import KVLoadCost, LoadProfile
from cache.wire.tiers import Tier
from gateway.config import RoutingConfig
from gateway.policies import CacheAware, LeastLoad, PowerOfTwo, RoundRobin, RouteRequest, Session, make_policy
from gateway.workers import Worker


def workers(*loads: int) -> list[Worker]:
    return [
        Worker(url=f"http://w{i}", worker_id=f"w{i}", healthy=True, in_flight=load)
        for i, load in enumerate(loads)
    ]


def hit(blocks: int, host: int = 0, disk: int = 0) -> MatchResult:
    return MatchResult(blocks=blocks + host + disk, device_blocks=blocks, host_blocks=host, disk_blocks=disk)


def test_round_robin_cycles() -> None:
    pool = workers(0, 0, 0)
    policy = RoundRobin(RoutingConfig())
    chosen = [policy.choose(RouteRequest(100), pool).worker.worker_id for _ in range(6)]
    assert chosen == ["w0", "w1", "w2", "w0", "w1", "w2"]


def test_least_load_and_power_of_two_avoid_the_busy_worker() -> None:
    pool = workers(5, 0)
    assert LeastLoad(RoutingConfig()).choose(RouteRequest(10), pool).worker.worker_id == "w1"
    p2 = PowerOfTwo(RoutingConfig(), random.Random(0))
    assert all(p2.choose(RouteRequest(10), pool).worker.worker_id == "w1" for _ in range(10))


def test_cache_aware_prefers_the_worker_holding_the_prefix() -> None:
    pool = workers(0, 0)
    decision = CacheAware(RoutingConfig()).choose(RouteRequest(1000, {"w1": hit(60)}), pool)
    assert decision.worker.worker_id == "w1"
    assert decision.reason == "cache_hit"
    assert decision.predicted_cached_tokens == 960


def test_cache_aware_weighs_hits_against_load() -> None:
    config = RoutingConfig(load_cost_tokens=256, bounded_load_factor=10)
    # w1 holds 160 tokens more but has two requests more: 2 x 256 > 160, so w0 wins
    pool = workers(0, 2)
    decision = CacheAware(config).choose(RouteRequest(1000, {"w0": hit(10), "w1": hit(20)}), pool)
    assert decision.worker.worker_id == "w0"
    # a 900-token advantage outweighs the same load difference
    decision = CacheAware(config).choose(RouteRequest(1000, {"w1": hit(60)}), pool)
    assert decision.worker.worker_id == "w1"


def test_cache_aware_host_tier_counts_partly() -> None:
    config = RoutingConfig(host_tier_weight=0.25, load_cost_tokens=0)
    pool = workers(0, 0)
    request = RouteRequest(1000, {"w0": hit(0, host=40), "w1": hit(20)})  # 640 host vs 320 device tokens
    assert CacheAware(config).choose(request, pool).worker.worker_id == "w1"  # 160 effective < 320


def test_lower_tier_hits_weigh_what_the_worker_measured_loading_saves() -> None:
    config = RoutingConfig(host_tier_weight=0.25, load_cost_tokens=0)
    pool = workers(0, 0)
    # Loading from the host costs a tenth of recomputing on w0, from disk 0.6 of it.
    measured = KVLoadCost(prefill_s_per_token=1e-3, host_s_per_token=1e-4, disk_s_per_token=6e-4)
    pool[0].load_profile = LoadProfile(kv_load=measured)
    policy = CacheAware(config)
    assert policy.tier_weight(pool[0], Tier.HOST) == pytest.approx(0.9)
    assert policy.tier_weight(pool[1], Tier.HOST) == 0.25  # w1 has not said: the flag's constant
    host_hit = RouteRequest(1000, {"w0": hit(0, host=40), "w1": hit(20)})  # 640 host vs 320 device tokens
    assert policy.effective_cached(host_hit, pool[0]) == pytest.approx(576)
    assert policy.choose(host_hit, pool).worker.worker_id == "w0"  # 576 effective > 320
    disk_hit = RouteRequest(1000, {"w0": hit(0, disk=40), "w1": hit(20)})
    assert policy.effective_cached(disk_hit, pool[0]) == pytest.approx(256)  # weighed by the disk's cost
    assert policy.choose(disk_hit, pool).worker.worker_id == "w1"
    # Measured, but its disk path not yet (no page file read): the constant stands in for that tier only.
    pool[0].load_profile = LoadProfile(kv_load=KVLoadCost(1e-3, 1e-4, None))
    assert policy.tier_weight(pool[0], Tier.DISK) == 0.25 and policy.tier_weight(pool[0], Tier.HOST) > 0.25
    # Loading slower than recomputing: the engine recomputes, so the hit saves nothing.
    pool[0].load_profile = LoadProfile(kv_load=KVLoadCost(1e-3, 2e-3, 3e-3))
    assert policy.effective_cached(RouteRequest(1000, {"w0": hit(2, host=10, disk=10)}), pool[0]) == 32


def test_a_lower_tier_prefix_the_engine_would_recompute_counts_nothing() -> None:
    policy = CacheAware(RoutingConfig(host_tier_weight=0.5))
    (worker,) = workers(0)
    worker.load_profile = LoadProfile(kv_load=KVLoadCost(min_load_tokens=256))  # unmeasured, but says so
    assert policy.effective_cached(RouteRequest(1000, {"w0": hit(4, host=10)}), worker) == 64  # 160 < 256
    assert policy.effective_cached(RouteRequest(1000, {"w0": hit(4, host=20)}), worker) == 64 + 160


def test_decisions_split_predicted_tokens_by_tier() -> None:
    def split(prompt_tokens: int) -> tuple[int, int, int]:
        request = RouteRequest(prompt_tokens, {"w0": hit(10, host=20, disk=30)})  # 160 + 320 + 480 tokens
        d = LeastLoad(RoutingConfig()).choose(request, workers(0))
        return d.predicted_cached_tokens, d.predicted_host_tokens, d.predicted_disk_tokens

    assert split(1000) == (960, 320, 480)
    assert split(600) == (599, 320, 119)  # never the whole prompt: the device's share counts first


def test_bounded_load_guard_stops_hot_spots() -> None:
    config = RoutingConfig(load_cost_tokens=0, bounded_load_factor=1.25, bounded_load_slack=4)
    pool = workers(6, 0)  # w0 holds the prefix but already carries everything
    decision = CacheAware(config).choose(RouteRequest(1000, {"w0": hit(60)}), pool)
    assert decision.worker.worker_id == "w1"
    assert decision.reason == "load_bound"


def test_session_affinity_is_honoured_unless_it_overloads() -> None:
    config = RoutingConfig(bounded_load_factor=1.5, bounded_load_slack=2)
    request = RouteRequest(100, {}, session_id="s", pinned_worker="w0")
    assert CacheAware(config).choose(request, workers(1, 1)).reason == "session"
    assert CacheAware(config).choose(request, workers(9, 0)).worker.worker_id == "w1"
    assert Session(config).choose(request, workers(9, 0)).worker.worker_id == "w0"  # strict stickiness
    assert Session(config).choose(RouteRequest(100), workers(3, 1)).worker.worker_id == "w1"


def test_prediction_never_claims_the_whole_prompt() -> None:
    # the engine always computes the last prompt token, so at most prompt_tokens - 1 are reusable
    decision = CacheAware(RoutingConfig()).choose(RouteRequest(32, {"w0": hit(2)}), workers(0))
    assert decision.predicted_cached_tokens == 31


def test_unknown_policy_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("fastest", RoutingConfig())


def test_slack_keeps_small_imbalances_cache_affine() -> None:
    config = RoutingConfig(load_cost_tokens=0, bounded_load_factor=1.5, bounded_load_slack=4)
    request = RouteRequest(1000, {"w0": hit(60)})
    assert CacheAware(config).choose(request, workers(3, 0)).worker.worker_id == "w0"  # 4 <= 0 + 4
    assert CacheAware(config).choose(request, workers(4, 0)).worker.worker_id == "w1"  # 5 > max(3, 4)
