"""The engine's one measure of its steps (``engine.step_times``) as its readers other than the SLO budget
see it (``test_step_budget.py`` has the line and the budget): the prefill rate and decode points that
``GET /load_profile`` publishes, the same rate deciding KV tier load-backs, and the real engine observing
every step once."""

from __future__ import annotations

import random

import pytest

from cache.api.sampling import SamplingParams
from cache.planning.load_profile import DecodePoint
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.kv.load_cost import LoadCost
from engine.step_times import StepTimes


def test_prefill_and_decode_steps_land_in_their_own_figures() -> None:
    steps = StepTimes(2048, max_batch=64, alpha=0.5)
    steps.observe(1000, 0.5)  # 2000 tok/s
    steps.observe(500, 0.125, decodes=20)  # 4000 tok/s: 480 prompt tokens, and the decodes count
    steps.observe(11, 1.0, decodes=3)  # 8 prompt tokens: too few to say anything of prefill
    steps.observe(1, 0.010, decodes=1)
    steps.observe(5, 0.020, decodes=5)
    steps.observe(7, 0.030, decodes=7)  # same bucket (4-7) as 5
    profile = steps.load_profile()
    assert profile.prefill_tokens_per_s == pytest.approx(3000) == steps.prefill_tokens_per_s
    assert profile.decode == (DecodePoint(1, 0.010, 1), DecodePoint(6, 0.025, 2))
    assert profile.max_batch == 64 and profile.kv_load is None  # the tiers add their own figures
    assert steps.load_profile() is profile  # unchanged: the same immutable snapshot
    steps.observe(11, 1.0, decodes=3)  # teaches the line only
    assert steps.load_profile() is profile and steps.num_samples == 7
    steps.observe(4, 0.02, decodes=4)
    assert steps.load_profile() is not profile


def test_the_rate_counts_prompt_tokens_not_batch_size() -> None:
    """A step of many decodes and a few prompt tokens is not a prefill, however many tokens it batches."""
    steps = StepTimes(2048, min_rate_prompt_tokens=32)
    steps.observe(64, 0.1, decodes=40)  # 24 prompt tokens
    steps.observe(0, 0.1)  # empty steps and bad timings are ignored by every figure
    steps.observe(64, float("nan"))
    assert steps.prefill_tokens_per_s is None and steps.load_profile().decode == ()
    steps.observe(64, 0.1, decodes=32)  # 32 prompt tokens
    assert steps.prefill_tokens_per_s == pytest.approx(640)
    assert steps.num_samples == 2


def test_a_cold_first_step_washes_out_of_the_rate_as_a_running_mean() -> None:
    steps = StepTimes(2048)  # alpha 0.2: a running mean over the first 5 steps
    steps.observe(1000, 10.0)  # the first forward pass of a cold engine: 100 tok/s
    for _ in range(4):
        steps.observe(1000, 0.1)  # 10,000 tok/s
    assert steps.prefill_tokens_per_s == pytest.approx((100 + 4 * 10_000) / 5)


def test_load_back_weighs_the_shared_rate() -> None:
    """LoadCost keeps no rate of its own: it reads the measure, and assumes loading pays until there is one."""
    steps = StepTimes(2048)
    cost = LoadCost(min_load_tokens=64, prefill_rate=lambda: steps.prefill_tokens_per_s)
    assert cost.pays(1000, load_seconds=100.0), "no rate yet: a copy is assumed cheaper"
    assert not cost.pays(63, load_seconds=0.0), "too short to be worth a copy"
    assert cost.per_token(1024, 1e9, None).prefill_s_per_token is None
    steps.observe(2000, 1.0)  # 2,000 tok/s: 1,000 tokens recompute in 0.5 s
    assert cost.pays(1000, load_seconds=0.4) and not cost.pays(1000, load_seconds=0.6)
    per_token = cost.per_token(1024, 1e9, 5e8)
    assert per_token.prefill_s_per_token == pytest.approx(1 / 2000)
    assert per_token.host_s_per_token == pytest.approx(1024 / 1e9)
    assert per_token.disk_s_per_token == pytest.approx(1024 / 1e9 + 1024 / 5e8)
    assert per_token.min_load_tokens == 64


@pytest.mark.slow
def test_the_engine_observes_each_step_once_for_every_reader(smollm2_model, smollm2_gguf_path) -> None:
    """With KV tiers, the load-back cost published at GET /load_profile recomputes at the very rate the
    profile publishes, and the measure saw each forward step exactly once."""
    config = EngineConfig(
        model=str(smollm2_gguf_path),
        dtype="float32",
        kv_cache_tokens=1024,
        max_batch_tokens=128,
        enable_hierarchical_cache=True,
    )
    engine = LLMEngine(config, smollm2_model)
    rng = random.Random(0)
    prompt = [rng.randrange(100, engine.model.config.vocab_size) for _ in range(300)]
    engine.add(
        engine.make_sequence("a", prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    )
    steps = 0
    while engine.scheduler.has_work():
        engine.step()
        steps += 1
    assert steps >= 3 + 5  # 300 prompt tokens in chunks of at most 128, then a decode per further token
    assert engine.step_time.num_samples == steps
    profile = engine.stats().load_profile
    assert profile.prefill_tokens_per_s is not None and profile.kv_load is not None
    assert profile.kv_load.prefill_s_per_token == pytest.approx(1 / profile.prefill_tokens_per_s)
    assert sum(p.steps for p in profile.decode) == 5 and profile.decode[0].batch == 1
