"""Prefix reuse and memory pressure with the real SmolLM2 (fp32): a shared 1,000-token prefix is
not computed again, and eviction under a small KV pool never touches a running request's pages."""

from __future__ import annotations

import random

import pytest

from cache.api.sampling import SamplingParams
from engine.engine import LLMEngine
from engine.scheduler import Batch
from engine.sequence import Sequence
from tests.engine.test_scheduler import check_invariants

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def count_computed_tokens(engine: LLMEngine) -> dict[str, int]:
    """Wrap the runner so that every token it actually runs through the model is counted per request."""
    counts: dict[str, int] = {}
    run = engine.runner.run

    def counting_run(batch: Batch):
        for chunk in batch.chunks:
            counts[chunk.seq.request_id] = counts.get(chunk.seq.request_id, 0) + chunk.length
        return run(batch)

    engine.runner.run = counting_run  # type: ignore[method-assign]
    return counts


def run(engine: LLMEngine, seqs: list[Sequence], check_every_step: bool = False) -> list[Sequence]:
    for s in seqs:
        engine.add(s)
    while engine.scheduler.has_work():
        engine.step()
        if check_every_step:
            check_invariants(engine.scheduler)
    assert engine.pool.num_used == engine.cache.num_pages
    assert engine.scheduler.pages_held_by_requests == 0
    return seqs


def test_shared_1000_token_prefix_is_computed_once(smollm2_engine_factory) -> None:
    engine = smollm2_engine_factory(max_batch_tokens=512)
    rng = random.Random(0)
    vocab = engine.model.config.vocab_size
    prefix = [rng.randrange(100, vocab) for _ in range(1000)]
    first = prefix + [rng.randrange(100, vocab) for _ in range(20)]
    second = prefix + [rng.randrange(100, vocab) for _ in range(24)]
    counts = count_computed_tokens(engine)
    (a,) = run(engine, [engine.make_sequence("a", first, GREEDY)])
    assert a.num_cached_prompt == 0 and counts["a"] == len(first) + GREEDY.max_tokens - 1
    (b,) = run(engine, [engine.make_sequence("b", second, GREEDY)])
    assert b.num_cached_prompt >= 992
    # only the rest of the prompt is prefilled, then one token per decode step
    assert counts["b"] == len(second) - b.num_cached_prompt + GREEDY.max_tokens - 1
    cold = smollm2_engine_factory(max_batch_tokens=512)
    (b_cold,) = run(cold, [cold.make_sequence("b", second, GREEDY)])
    assert b_cold.num_cached_prompt == 0
    assert b.output_ids == b_cold.output_ids
    assert engine.flush_cache() and engine.pool.num_used == 0


TEXTS = [
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue.",
    "Write a short poem about a cat who learns to read.",
    "List three prime numbers greater than ten and explain how you checked each of them.",
    "Summarize the plot of a detective story set on a train in the mountains.",
    "Give me a recipe for pancakes with three ingredients.",
]
SYSTEM = "You are a careful assistant. Answer briefly, and say when you are not sure."


def pressure_prompts(engine: LLMEngine) -> list[list[int]]:
    """Half the prompts share a system prompt, so running requests share (locked) tree pages."""
    tok = engine.tokenizer
    out = []
    for i, text in enumerate(TEXTS):
        msgs = [{"role": "user", "content": text}]
        if i % 2:
            msgs.insert(0, {"role": "system", "content": SYSTEM})
        out.append(tok.encode(tok.apply_chat_template(msgs)))
    return out


def test_eviction_under_pressure_never_frees_running_pages(smollm2_engine_factory) -> None:
    roomy = smollm2_engine_factory(max_batch_tokens=64)
    prompts = pressure_prompts(roomy)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = [
        s.output_ids
        for s in run(roomy, [roomy.make_sequence(f"r{i}", p, params) for i, p in enumerate(prompts)])
    ]

    tight = smollm2_engine_factory(max_batch_tokens=64, kv_cache_tokens=16 * 16)
    need = sum(-(-(len(p) + params.max_tokens) // 16) for p in prompts)
    assert need > tight.info.num_pages, "the batch must not fit: eviction and preemption are the point"
    # fill the cache with pages of finished requests so that admission has to evict them
    run(tight, [tight.make_sequence("filler", list(range(300, 450)), GREEDY)])
    assert tight.cache.num_pages >= 9

    evicted = []
    evict = tight.cache.evict

    def checked_evict(num_pages: int) -> int:
        freed = evict(num_pages)
        evicted.append(freed)
        for seq in tight.scheduler.running:
            assert not any(tight.pool._is_free[p] for p in seq.pages), "evicted a running request's page"
        return freed

    tight.cache.evict = checked_evict  # type: ignore[method-assign]
    seqs = [tight.make_sequence(f"t{i}", p, params) for i, p in enumerate(prompts)]
    run(tight, seqs, check_every_step=True)
    assert sum(evicted) > 0 and tight.scheduler.num_preemptions > 0
    assert [s.output_ids for s in seqs] == expected
    assert tight.flush_cache() and tight.pool.num_used == 0
