"""Penalties, logit bias, logprobs and n > 1 through ``LLMEngine`` with the real SmolLM2 (fp32), each
against a reference computed from the model's own logits.

The reference runs the model's forward once over prompt + output (no cache, no scheduler), takes
the logits of every position and applies the formulas (``tests.engine.test_sampling.reference_logits``)
to each step's history: a greedy token must be the argmax, a seeded one the same draw from the same
generator, a reported logprob the raw ``log_softmax``. Requests run together in mixed batches.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cache.api.sampling import SamplingParams
from engine.engine import LLMEngine
from engine.model_runner import allocate_kv
from engine.models.attention import AttentionBatch, PrefillSegment
from engine.sampling import TokenLogprobs
from engine.sequence import FinishReason, Sequence
from tests.engine.test_sampling import reference_logits

pytestmark = pytest.mark.slow

TEXTS = [
    "Write a list of ten fruits, one per line.",
    "Repeat after me: the cat sat on the mat, the cat sat on the mat.",
    "What is the capital of France?",
]


@pytest.fixture(scope="module")
def prompts(smollm2_engine_factory) -> list[list[int]]:
    tok = smollm2_engine_factory().tokenizer
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}])) for t in TEXTS]


def model_logits(engine: LLMEngine, ids: list[int]) -> torch.Tensor:
    """The next-token logits after every position of ``ids`` ([T, V]): one plain forward pass."""
    page_size, n = engine.info.page_size, len(ids)
    kv = allocate_kv(engine.model, -(-n // page_size), page_size, torch.float32)
    slots = torch.arange(n)
    batch = AttentionBatch(slots, [PrefillSegment(0, n, slots, None)], None)
    return engine.model(torch.tensor(ids), torch.arange(n), batch, kv, torch.arange(n)).float()


def run(engine: LLMEngine, seqs: list[Sequence]) -> dict[Sequence, list[TokenLogprobs | None]]:
    """Add every sequence (forks start themselves) and step until all finish; the logprobs each
    sequence reported, token by token."""
    logprobs: dict[Sequence, list[TokenLogprobs | None]] = {}
    for s in seqs:
        engine.add(s)
    while engine.scheduler.has_work():
        for s in engine.step():
            if not s.finished or s.finish_reason is not FinishReason.ABORT:
                logprobs.setdefault(s, []).append(s.last_logprobs)
    assert engine.pool.num_used == engine.cache.num_pages and engine.scheduler.pages_held_by_requests == 0
    return logprobs


def history(s: Sequence, t: int) -> Sequence:
    """``s`` as it stood before sampling its output token ``t``."""
    view = Sequence(s.request_id, s.prompt_ids, s.sampling)
    view.output_ids = s.output_ids[:t]
    return view


def check_greedy(engine: LLMEngine, s: Sequence) -> None:
    logits = model_logits(engine, s.prompt_ids + s.output_ids)
    for t, token in enumerate(s.output_ids):
        want = int(reference_logits(logits[len(s.prompt_ids) - 1 + t], history(s, t)).argmax())
        assert token == want, (t, s.sampling)


PARAMS = {
    "plain": SamplingParams(),
    "presence": SamplingParams(presence_penalty=2.0),
    "frequency": SamplingParams(frequency_penalty=1.5),
    "repetition": SamplingParams(repetition_penalty=1.6),
    "negative": SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5, repetition_penalty=0.8),
    "bias": SamplingParams(logit_bias=((28, 8.0), (30, 100.0), (2, -100.0))),
    "all": SamplingParams(
        logit_bias=((28, 3.0),), presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2
    ),
}


def params(base: SamplingParams, **changes) -> SamplingParams:
    return replace(base, **{"max_tokens": 10, "temperature": 0, "ignore_eos": True, **changes})


def test_a_mixed_greedy_batch_matches_the_reference_row_by_row(smollm2_engine_factory, prompts) -> None:
    """Plain and penalised requests, all in one batch (small budget: chunked prefills next to
    decodes): each output is its own reference's, plain ones included."""
    engine = smollm2_engine_factory(max_batch_tokens=48)
    seqs = [engine.make_sequence(name, prompts[0], params(base)) for name, base in PARAMS.items()]
    seqs.append(engine.make_sequence("other", prompts[1], params(PARAMS["plain"])))
    run(engine, seqs)
    for s in seqs:
        check_greedy(engine, s)
    outputs = {s.request_id: tuple(s.output_ids) for s in seqs}
    assert len(set(outputs.values())) >= 5, outputs  # the adjustments changed the answers
    assert outputs["bias"].count(30) == len(outputs["bias"])  # +100 wins every step


def test_seeded_sampling_with_penalties_draws_the_reference(smollm2_engine_factory, prompts) -> None:
    sampled = SamplingParams(
        max_tokens=8,
        temperature=0.8,
        top_k=40,
        seed=77,
        ignore_eos=True,
        frequency_penalty=1.0,
        repetition_penalty=1.3,
    )
    engine = smollm2_engine_factory()
    seqs = [
        engine.make_sequence("s", prompts[1], sampled),
        engine.make_sequence("g", prompts[1], params(PARAMS["plain"])),
    ]
    run(engine, seqs)
    s = seqs[0]
    logits = model_logits(engine, s.prompt_ids + s.output_ids)
    generator = torch.Generator().manual_seed(77)
    for t, token in enumerate(s.output_ids):
        x = reference_logits(logits[len(s.prompt_ids) - 1 + t], history(s, t)) / sampled.temperature
        x = x.masked_fill(x < torch.topk(x, sampled.top_k).values[-1], float("-inf"))
        assert token == int(torch.multinomial(torch.softmax(x, -1), 1, generator=generator)), t
    check_greedy(engine, seqs[1])


def test_logprobs_are_the_raw_model_distribution(smollm2_engine_factory, prompts) -> None:
    """Reported whatever the sampling (temperature, penalties, bias): log_softmax of the raw logits."""
    engine = smollm2_engine_factory()
    asks = [
        params(PARAMS["plain"], logprobs=5),
        params(PARAMS["all"], logprobs=20, temperature=1.2, seed=3),
        params(PARAMS["plain"], logprobs=0),
        params(PARAMS["plain"]),
    ]
    seqs = [engine.make_sequence(f"l{i}", prompts[0], p) for i, p in enumerate(asks)]
    reported = run(engine, seqs)
    for s in seqs:
        if s.sampling.logprobs is None:
            assert reported[s] == [None] * len(s.output_ids)
            continue
        raw = model_logits(engine, s.prompt_ids + s.output_ids).log_softmax(-1)
        for t, (token, lp) in enumerate(zip(s.output_ids, reported[s], strict=True)):
            assert lp is not None
            row = raw[len(s.prompt_ids) - 1 + t]
            assert lp.logprob == pytest.approx(row[token].item(), abs=1e-3)
            k = s.sampling.logprobs
            assert len(lp.top) == k
            if k:
                top = row.topk(k)
                assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-3)
                assert lp.top[0][0] == int(top.indices[0])
    assert seqs[0].output_ids == seqs[2].output_ids == seqs[3].output_ids  # logprobs change nothing


# -- n > 1 ------------------------------------------------------------------------------------------
def prompt_tokens_computed(engine: LLMEngine, prompt_len: int) -> list[int]:
    """Counts, step by step, how many prompt positions the engine computes (wraps the runner)."""
    computed: list[int] = []
    real = engine.runner.run

    def counting(batch):
        computed.append(sum(max(0, min(c.start + c.length, prompt_len) - c.start) for c in batch.chunks))
        return real(batch)

    engine.runner.run = counting  # type: ignore[method-assign]
    return computed


@pytest.mark.parametrize("prompt_len", [37, 48])  # a partly filled last page, and whole pages only
def test_n_choices_prefill_once_and_equal_single_requests(
    smollm2_engine_factory, prompts, prompt_len
) -> None:
    prompt = (prompts[0] * 3)[:prompt_len]
    engine = smollm2_engine_factory()
    computed = prompt_tokens_computed(engine, prompt_len)
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=11, ignore_eos=True, n=4)
    parent = engine.make_sequence("n4", prompt, seeded)
    choices = [parent, *parent.forks]
    assert [c.choice for c in choices] == [0, 1, 2, 3] and [c.sampling.seed for c in choices] == [
        11,
        12,
        13,
        14,
    ]
    run(engine, [parent])
    assert sum(computed) == prompt_len, "the prompt is computed once for every choice"
    assert all(c.num_cached_prompt == 0 and len(c.output_ids) == 8 for c in choices)
    alone = smollm2_engine_factory()  # each choice is the request it would be alone, with seed + i
    singles = [alone.make_sequence(f"one{i}", prompt, replace(seeded, n=1, seed=11 + i)) for i in range(4)]
    run(alone, singles)
    assert [c.output_ids for c in choices] == [s.output_ids for s in singles]
    assert len({tuple(c.output_ids) for c in choices}) > 1


def test_greedy_choices_with_penalties_match_the_reference(smollm2_engine_factory, prompts) -> None:
    engine = smollm2_engine_factory()
    parent = engine.make_sequence("g", prompts[1], params(PARAMS["all"], n=3, logprobs=2))
    choices = [parent, *parent.forks]
    reported = run(engine, [parent])
    for c in choices:
        check_greedy(engine, c)
        assert len(reported[c]) == len(c.output_ids) and all(lp is not None for lp in reported[c])
    assert choices[0].output_ids == choices[1].output_ids == choices[2].output_ids


def test_choices_that_find_no_slot_wait_and_recompute_only_the_last_page(
    smollm2_engine_factory, prompts
) -> None:
    engine = smollm2_engine_factory(max_running=2, max_batch_tokens=64)
    computed = prompt_tokens_computed(engine, len(prompts[2]))
    parent = engine.make_sequence("w", prompts[2], params(PARAMS["plain"], n=4))
    run(engine, [parent])
    choices = [parent, *parent.forks]
    assert len({tuple(c.output_ids) for c in choices}) == 1
    check_greedy(engine, parent)
    partial = len(prompts[2]) % engine.info.page_size
    assert sum(computed) == len(prompts[2]) + 2 * partial  # two choices waited: their last page again
    assert all(c.num_cached_prompt == 0 for c in choices)


def test_choices_finish_on_their_own(smollm2_engine_factory, prompts) -> None:
    engine = smollm2_engine_factory()
    one = engine.make_sequence("one", prompts[0], SamplingParams(max_tokens=1, temperature=1.0, seed=5, n=5))
    run(engine, [one])
    choices = [one, *one.forks]
    assert all(len(c.output_ids) == 1 and c.finish_reason is FinishReason.LENGTH for c in choices)
    eos = engine.info.eos_token_ids[0]
    stops = engine.make_sequence("s", prompts[2], SamplingParams(max_tokens=30, temperature=0, n=2))
    run(engine, [stops])
    assert all(
        c.output_ids[-1] == eos and c.finish_reason is FinishReason.STOP for c in (stops, *stops.forks)
    )


def test_aborting_a_request_ends_every_choice_and_frees_its_pages(smollm2_engine_factory, prompts) -> None:
    engine = smollm2_engine_factory(max_batch_tokens=16)
    parent = engine.make_sequence("a", prompts[1], params(PARAMS["presence"], n=3, max_tokens=50))
    forks = list(parent.forks)
    engine.add(parent)
    engine.step()  # mid-prefill: the other choices have not started
    engine.abort(parent)
    assert (
        all(c.finish_reason is FinishReason.ABORT for c in (parent, *forks))
        and not engine.runner.sampler._states
    )
    parent = engine.make_sequence("b", prompts[1], params(PARAMS["presence"], n=3, max_tokens=50))
    forks = list(parent.forks)
    engine.add(parent)
    while not forks[0].output_ids:
        engine.step()
    engine.step()
    for c in (parent, *forks):
        engine.abort(c)
    assert engine.pool.num_used == engine.cache.num_pages and engine.scheduler.pages_held_by_requests == 0
    assert not engine.runner.sampler._states
