"""The SLO-driven token budget (``--itl-slo-ms``): the online step-time line (``engine.step_times``) on
synthetic timings, the scheduler's hook, and the real engine cutting prefill chunks to the budget without
changing a token."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest

from cache.api.sampling import SamplingParams
from engine.config import EngineConfig
from engine.engine import EngineStats, LLMEngine
from engine.kv.page_pool import PagePool
from engine.kv.prefix_cache import PrefixCache
from engine.scheduler import Batch, Scheduler, SchedulerConfig
from engine.sequence import Sequence
from engine.server.metrics import ServerMetrics
from engine.step_times import StepTimeFit, StepTimes

A, B = 0.020, 0.0005  # 20 ms per step + 0.5 ms per token


def trained(sizes, a=A, b=B, noise=0.0, seed=0, cap=2048) -> StepTimes:
    rng = random.Random(seed)
    model = StepTimes(cap)
    for tokens in sizes:
        model.observe(tokens, (a + b * tokens) * (1 + rng.uniform(-noise, noise)))
    return model


def mixed_sizes(n: int = 400, seed: int = 1) -> list[int]:
    """Mostly decode steps, the rest prefill chunks of every size from 16 to 2,048 (log-uniform)."""
    rng = random.Random(seed)
    return [rng.choice([1, 4, 8]) if rng.random() < 0.7 else int(2 ** rng.uniform(4, 11)) for _ in range(n)]


def test_recovers_the_line_from_noisy_steps() -> None:
    fit = trained(mixed_sizes(), noise=0.05).fit
    assert fit is not None
    assert fit.fixed_s == pytest.approx(A, rel=0.15)
    assert fit.per_token_s == pytest.approx(B, rel=0.05)


def test_before_enough_samples_the_budget_is_the_cap() -> None:
    model = StepTimes(512)
    assert model.fit is None and model.budget(0.001, decodes=4) == 512
    model.observe(4, 0.02)
    model.observe(300, 0.2)
    assert model.fit is None and model.budget(0.001, decodes=4) == 512
    for bad in (0.0, -1.0, math.nan, math.inf):
        model.observe(8, bad)  # ignored, as are empty steps
    model.observe(0, 0.1)
    assert model.num_samples == 2


def test_budget_is_the_most_tokens_within_the_slo_and_monotone_in_it() -> None:
    model = trained(mixed_sizes())
    assert model.budget(A + B * 400) == pytest.approx(400, abs=8)
    budgets = [model.budget(slo_ms / 1e3, decodes=4) for slo_ms in range(1, 2000, 7)]
    assert budgets == sorted(budgets)
    assert budgets[0] == 4 + 16 and budgets[-1] == 2048
    fit = model.fit
    assert fit is not None
    for slo_s in (0.0301, 0.1003, 0.5007):  # off the grid of exact token boundaries
        n = model.budget(slo_s)
        assert fit.seconds(n) <= slo_s < fit.seconds(n + 1)


def test_clamps_hold() -> None:
    model = trained(mixed_sizes(), cap=256)
    assert model.budget(0.0, decodes=0) == 16, "prefill always progresses by a page"
    assert model.budget(0.0, decodes=60) == 76, "beyond every running decode"
    assert model.budget(10.0, decodes=4) == 256, "never beyond the static cap"
    assert model.budget(0.0, decodes=250) == 256, "the cap wins over the floor"


def test_one_step_size_gives_a_conservative_line_through_the_origin() -> None:
    """Decode-only steps say nothing of the slope: the fit charges the whole step to its tokens, so
    the budget stays small until bigger steps are measured."""
    model = trained([4] * 50)
    fit = model.fit
    assert fit is not None and fit.fixed_s == 0
    assert fit.per_token_s == pytest.approx((A + 4 * B) / 4)
    assert fit.per_token_s > B
    slo = 1.5 * (A + 4 * B)
    assert model.budget(slo, decodes=4) == 4 + 16  # the floor, where the real line allows 40
    for _ in range(20):  # steps at the floor are measured: the slope becomes visible, the budget grows
        model.observe(20, A + 20 * B)
    assert model.budget(slo, decodes=4) == pytest.approx((slo - A) / B, abs=2)


def test_a_cold_first_step_and_rare_spikes_wash_out() -> None:
    model = StepTimes(2048)
    model.observe(300, 50 * (A + 300 * B))  # the first forward pass: 50x slower
    rng = random.Random(3)
    for i, tokens in enumerate(mixed_sizes(600)):
        spike = 20 if rng.random() < 0.02 else 1  # a descheduled step now and then
        model.observe(tokens, (A + B * tokens) * spike)
        if i == 300:
            fit = model.fit
            assert fit is not None and fit.per_token_s == pytest.approx(B, rel=0.25)
    fit = model.fit
    assert fit is not None and fit.per_token_s == pytest.approx(B, rel=0.25)
    assert fit.fixed_s == pytest.approx(A, rel=0.5)


def test_tracks_a_machine_that_gets_slower() -> None:
    model = trained(mixed_sizes())
    for tokens in mixed_sizes(400, seed=2):
        model.observe(tokens, 3 * (A + B * tokens))
    fit = model.fit
    assert fit is not None and fit.per_token_s == pytest.approx(3 * B, rel=0.1)


def test_steps_with_decodes_that_cost_more_than_the_line_shrink_the_budget_to_fit() -> None:
    """Prefill-only steps follow the line; steps that carry decodes cost 25% more. Driving the model
    as the scheduler does (each decode step as big as the budget allows), the budget settles where
    those steps really fit the SLO."""
    model = trained([2048, 1024, 300, 4, 4, 4])
    slo = A + B * 200
    for _ in range(60):
        tokens = model.budget(slo, decodes=4)
        model.observe(tokens, 1.25 * (A + B * tokens), decodes=4)
    assert model.decode_step_factor > 1.05  # the line absorbs the rest: the decode steps are in its buckets
    assert 1.25 * (A + B * model.budget(slo, decodes=4)) == pytest.approx(slo, rel=0.03)
    assert model.budget(slo, decodes=0) < 200


def test_a_convex_noisy_machine_keeps_most_decode_steps_within_the_slo() -> None:
    """Step time grows faster than linearly (attention within a chunk) and wobbles by 5%: the line
    is a compromise, the feedback on steps with decodes brings their budget close to the ideal while
    keeping most of them within the SLO."""

    def step_s(tokens: int) -> float:
        return 0.05 + 0.004 * tokens + 2e-6 * tokens * tokens

    rng = random.Random(5)
    for slo, ideal in ((0.19, 34), (0.4, 85), (1.0, 215)):  # the most tokens with step_s <= slo
        model = StepTimes(2048)
        for tokens in [4, 4, 4, 2048, 500, 256, 30, 4]:  # prefill-only steps, then decodes
            model.observe(tokens, step_s(tokens))
        within = []
        for _ in range(200):
            tokens = model.budget(slo, decodes=4)
            seconds = step_s(tokens) * (1 + rng.uniform(-0.05, 0.05))
            model.observe(tokens, seconds, decodes=4)
            within.append(seconds <= slo)
        assert sum(within[50:]) / 150 >= 0.9
        assert 0.8 * ideal <= model.budget(slo, decodes=4) <= ideal


def test_memory_is_bounded_by_the_step_sizes() -> None:
    model = trained(mixed_sizes(5000), cap=2048)
    assert model.num_buckets <= (2048).bit_length()


def test_the_fit_predicts_and_inverts() -> None:
    fit = StepTimeFit(0.01, 0.001)
    assert fit.seconds(10) == pytest.approx(0.02)
    assert fit.tokens_within(0.02) in (9, 10)  # floating point at the boundary
    assert fit.tokens_within(0.005) < 0


def test_config_checks_the_slo() -> None:
    assert EngineConfig(itl_slo_ms=40).itl_slo_ms == 40
    for bad in (0, -5, math.nan, math.inf):
        with pytest.raises(ValueError, match="itl_slo_ms"):
            EngineConfig(itl_slo_ms=bad)


def test_metrics_show_the_budget_and_the_line() -> None:
    stats = EngineStats(step_token_budget=48, step_time_fixed_s=0.02, step_time_per_token_s=0.0005)
    engine = SimpleNamespace(info=SimpleNamespace(model_id="m"), stats=stats)
    text = ServerMetrics(engine).render().decode()  # type: ignore[arg-type]
    assert "prefixgate_engine_step_token_budget 48.0" in text
    assert "prefixgate_engine_step_time_fixed_seconds 0.02" in text
    assert "prefixgate_engine_step_time_per_token_seconds 0.0005" in text


# -- the scheduler's hook, no model ----------------------------------------------------------------


def test_scheduler_limits_only_steps_that_carry_decodes() -> None:
    pool = PagePool(64)
    sched = Scheduler(SchedulerConfig(4, 64, 8), pool, PrefixCache(pool, 4), step_token_limit=lambda d: d + 5)
    params = SamplingParams(max_tokens=50, temperature=0)
    first = Sequence("a", list(range(1, 31)), params, frozenset(), 1 << 20)
    sched.add(first)
    batch = sched.schedule()
    assert batch is not None and batch.num_tokens == 30, "no decode in the step: the full budget"
    sched.postprocess(batch, {first: 7})
    second = Sequence("b", list(range(100, 140)), params, frozenset(), 1 << 20)
    sched.add(second)
    lengths = []
    while second.num_computed < 40 or not second.output_ids:
        batch = sched.schedule()
        assert batch is not None
        lengths.append(batch.num_tokens)
        sched.postprocess(batch, {c.seq: 7 for c in batch.chunks if c.samples})
    assert lengths == [6] * 8, "one decode + a 5-token prefill chunk per step"


# -- the real engine -------------------------------------------------------------------------------


class FixedStepTime(StepTimes):
    """A step-time model that knows its line in advance and learns nothing (a scripted machine)."""

    def __init__(self, fit: StepTimeFit, max_batch_tokens: int, min_prefill_tokens: int) -> None:
        super().__init__(max_batch_tokens, min_prefill_tokens)
        self._fixed = fit

    @property
    def fit(self) -> StepTimeFit:
        return self._fixed

    def observe(self, tokens: int, seconds: float, decodes: int = 0) -> None:
        pass


@pytest.mark.slow
def test_engine_cuts_prefill_to_the_budget_and_keeps_greedy_outputs(
    smollm2_gguf_path, smollm2_model, smollm2_tokenizer
) -> None:
    """Decodes run while a long prompt arrives: with the SLO every step that decodes holds at most
    the predicted budget (the prompt is cut into chunks of what is left), and once they end the rest
    of the prompt goes in chunks of the cap; every output equals the static-budget run's, token for
    token."""
    tok = smollm2_tokenizer
    chats = ["Name three colours.", "Count from one to ten.", "What is a cat?"]
    short = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}])) for t in chats]
    long_text = " ".join(f"Item {i}: the weather in city number {i} is mild and dry." for i in range(40))
    long = tok.encode(tok.apply_chat_template([{"role": "user", "content": long_text}]))
    assert len(long) > 400
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    line = StepTimeFit(fixed_s=0.020, per_token_s=0.001)  # 60 tokens fit in a 80 ms step

    def run(itl_slo_ms: float | None) -> tuple[list[list[int]], list[tuple[int, int]]]:
        config = EngineConfig(
            model=str(smollm2_gguf_path),
            dtype="float32",
            kv_cache_tokens=4096,
            max_batch_tokens=256,
            itl_slo_ms=itl_slo_ms,
        )
        engine = LLMEngine(config, smollm2_model)
        if itl_slo_ms is not None:
            engine.step_time = FixedStepTime(line, 256, config.page_size)
        steps: list[tuple[int, int]] = []  # (decodes, tokens) of every step
        schedule = engine.scheduler.schedule

        def recording() -> Batch | None:
            batch = schedule()
            if batch is not None:
                steps.append((batch.num_decodes, batch.num_tokens))
            return batch

        engine.scheduler.schedule = recording  # type: ignore[method-assign]
        seqs = [engine.make_sequence(f"s{i}", p, greedy) for i, p in enumerate(short)]
        for s in seqs:
            engine.add(s)
        while any(len(s.output_ids) < 3 for s in seqs):
            engine.step()
        late = engine.make_sequence("long", long, greedy)
        engine.add(late)
        seqs.append(late)
        if itl_slo_ms is not None:
            assert engine.stats().step_token_budget == 60
        while engine.scheduler.has_work():
            engine.step()
        return [s.output_ids for s in seqs], steps

    static_out, static_steps = run(None)
    slo_out, slo_steps = run(80.0)
    assert slo_out == static_out
    assert any(d and n > 60 for d, n in static_steps), "the static budget mixes long chunks with decodes"
    with_decodes = [(d, n) for d, n in slo_steps if d]
    assert all(n <= 60 for _, n in with_decodes)
    assert sum(1 for d, n in with_decodes if n == 60) >= 3, "the long prompt was cut to the budget"
    assert any(not d and n == 256 for d, n in slo_steps), "steps without decodes use the cap"
