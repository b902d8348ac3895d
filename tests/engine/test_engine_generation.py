"""The real SmolLM2 through ``LLMEngine`` (fp32): greedy outputs do not depend on how the work is cut.

The reference for every prompt is a greedy run on its own with a cold cache and the default budget.
Warm caches (full and partial prefix hits), small token budgets (chunked prefill), batching with
other prompts and preemption must all reproduce it token for token. Then sampling, finish reasons,
stop strings (the async API) and aborts.
"""

from __future__ import annotations

import asyncio

import pytest

from cache.api.errors import ApiError
from cache.api.requests import check_prompt
from cache.api.sampling import SamplingParams
from engine.async_engine import AsyncEngine
from engine.engine import LLMEngine
from engine.sequence import FinishReason, Sequence

pytestmark = pytest.mark.slow

MAX_TOKENS = 10
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)

TEXTS = [
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue.",
    "Write a short poem about a cat who learns to read.",
    "List three prime numbers greater than ten and explain how you checked each of them. "
    "Then explain what a prime number is to a child who is seven years old, with an example.",
    "Summarize the plot of a detective story set on a train in the mountains during a snowstorm, "
    "in which the detective must find out which of the twelve passengers stole a painting.",
]


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[Sequence]:
    """Add every prompt at once and step until all finish."""
    seqs = [engine.make_sequence(f"r{i}-{id(prompts)}", p, params) for i, p in enumerate(prompts)]
    for s in seqs:
        engine.add(s)
    while engine.scheduler.has_work():
        engine.step()
    check_accounting(engine)
    return seqs


def run_one_by_one(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams = GREEDY):
    return [run(engine, [p], params)[0] for p in prompts]


def check_accounting(engine: LLMEngine) -> None:
    """After all requests end, every used page belongs to the prefix cache and none is pinned."""
    assert engine.pool.num_used == engine.cache.num_pages
    assert engine.scheduler.pages_held_by_requests == 0


SYSTEM = "You are a careful assistant. Answer briefly, and say when you are not sure. " * 3


@pytest.fixture(scope="module")
def prompts(smollm2_engine_factory) -> list[list[int]]:
    """The chat-templated TEXTS, then the last two again behind a long shared system prompt."""
    tok = smollm2_engine_factory().tokenizer
    chats = [[{"role": "user", "content": t}] for t in TEXTS]
    chats += [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": t}] for t in TEXTS[:2]]
    return [tok.encode(tok.apply_chat_template(c)) for c in chats]


@pytest.fixture(scope="module")
def reference(smollm2_engine_factory, prompts) -> list[list[int]]:
    """Greedy outputs, each prompt alone on a cold engine with the default 512-token budget."""
    out = []
    for p in prompts:
        engine = smollm2_engine_factory()
        (seq,) = run(engine, [p])
        assert seq.num_cached_prompt == 0 and seq.finish_reason is FinishReason.LENGTH
        out.append(seq.output_ids)
    return out


def test_reference_is_sensible(smollm2_engine_factory, prompts, reference) -> None:
    text = smollm2_engine_factory().tokenizer.decode(reference[0])
    assert "Paris" in text, text
    assert all(len(r) == MAX_TOKENS for r in reference)
    assert len({tuple(r) for r in reference}) == len(reference)


@pytest.mark.parametrize(("budget", "page_size"), [(32, 16), (64, 16), (512, 16), (40, 8)])
def test_batched_and_chunked_equal_the_reference(
    smollm2_engine_factory, prompts, reference, budget, page_size
) -> None:
    """All prompts at once, with prefills chunked to the budget next to other requests' decodes."""
    engine = smollm2_engine_factory(max_batch_tokens=budget, page_size=page_size)
    seqs = run(engine, prompts)
    assert [s.output_ids for s in seqs] == reference


def test_warm_cache_full_hits_equal_the_reference(smollm2_engine_factory, prompts, reference) -> None:
    engine = smollm2_engine_factory(max_batch_tokens=64)
    plain = prompts[: len(TEXTS)]
    run(engine, plain)
    warm = run(engine, plain)
    assert [s.output_ids for s in warm] == reference[: len(TEXTS)]
    for p, s in zip(plain, warm, strict=True):
        # the whole prompt but its last token is cached, rounded down to whole pages
        assert s.num_cached_prompt == (len(p) - 1) // 16 * 16 > 0
    # a prompt that continues a finished request (prompt + output) hits the output's pages too
    i = next(i for i, p in enumerate(plain) if (len(p) + MAX_TOKENS - 1) // 16 > len(p) // 16)
    follow_up = plain[i] + reference[i]
    (s,) = run(engine, [follow_up], SamplingParams(max_tokens=1, temperature=0))
    assert s.num_cached_prompt == (len(follow_up) - 1) // 16 * 16 > len(plain[i]) // 16 * 16
    assert engine.flush_cache() and engine.pool.num_used == 0


def test_warm_cache_partial_hits_equal_the_reference(smollm2_engine_factory, prompts, reference) -> None:
    """Prompts that share a long prefix with a cached one (same system prompt, another question)."""
    engine = smollm2_engine_factory(max_batch_tokens=64)
    tok = engine.tokenizer
    warmup = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TEXTS[4]}]
    run(engine, [tok.encode(tok.apply_chat_template(warmup))], SamplingParams(max_tokens=1))
    shared = prompts[len(TEXTS) :]
    prefix = next(i for i, (x, y) in enumerate(zip(*shared, strict=False)) if x != y)
    assert prefix > 48
    hits = run(engine, shared)
    for s in hits:
        assert prefix // 16 * 16 <= s.num_cached_prompt < len(s.prompt_ids) - 1
    assert [s.output_ids for s in hits] == reference[len(TEXTS) :]


def test_batched_with_different_lengths_and_duplicates(smollm2_engine_factory, prompts, reference) -> None:
    """The same prompt twice in one batch (both compute the same pages; one copy is kept)."""
    engine = smollm2_engine_factory(max_batch_tokens=48)
    seqs = run(engine, [prompts[4], prompts[0], prompts[4], prompts[2]])
    assert [s.output_ids for s in seqs] == [reference[4], reference[0], reference[4], reference[2]]


def test_seeded_sampling_is_reproducible(smollm2_engine_factory, prompts) -> None:
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = run(smollm2_engine_factory(), [prompts[1]], params)[0].output_ids
    engine = smollm2_engine_factory(max_batch_tokens=32)
    batched = run(engine, [prompts[0], prompts[1], prompts[2]], params)
    assert batched[1].output_ids == alone, "a seeded request does not depend on its batch"
    again = run(engine, [prompts[1]], params)[0]  # warm cache, same seed
    assert again.output_ids == alone
    other_seeds = [
        run(engine, [prompts[1]], SamplingParams(max_tokens=10, temperature=0.9, seed=s, ignore_eos=True))[0]
        for s in (1, 2, 3)
    ]
    assert any(s.output_ids != alone for s in other_seeds)


def test_finish_reasons(smollm2_engine_factory, prompts, reference) -> None:
    engine = smollm2_engine_factory()
    eos = engine.info.eos_token_ids
    (s,) = run(engine, [prompts[0]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert s.output_ids == reference[0][:3] and s.finish_reason is FinishReason.LENGTH
    # a stop token id: generation ends on its first occurrence, which is included in the output
    stop_id = reference[2][5]
    first = reference[2].index(stop_id)
    (s,) = run(
        engine, [prompts[2]], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, stop_token_ids=(stop_id,))
    )
    assert s.output_ids == reference[2][: first + 1] and s.finish_reason is FinishReason.STOP
    # EOS: the instruct model ends a short answer with <|im_end|>
    (s,) = run(engine, [prompts[0]], SamplingParams(max_tokens=64, temperature=0))
    assert s.finish_reason is FinishReason.STOP and s.output_ids[-1] in eos
    n = min(len(s.output_ids), MAX_TOKENS)
    assert s.output_ids[:n] == reference[0][:n]
    (s2,) = run(
        engine, [prompts[0]], SamplingParams(max_tokens=len(s.output_ids) + 2, temperature=0, ignore_eos=True)
    )
    assert s2.finish_reason is FinishReason.LENGTH and s2.output_ids[: len(s.output_ids)] == s.output_ids
    # the context length
    short = smollm2_engine_factory(kv_cache_tokens=len(prompts[0]) + 4 + 16 - (len(prompts[0]) + 4) % 16)
    (s,) = run(short, [prompts[0]], SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
    assert s.finish_reason is FinishReason.LENGTH and s.num_tokens == short.info.max_model_len
    with pytest.raises(ApiError, match="context") as refused:  # the one check every server path runs
        check_prompt([1] * short.info.max_model_len, short.info.limits, "prompt")
    assert refused.value.code == "context_length_exceeded"


def test_abort_of_a_running_request_frees_its_pages(smollm2_engine_factory, prompts) -> None:
    engine = smollm2_engine_factory(max_batch_tokens=32)
    keep = engine.make_sequence("keep", prompts[0], GREEDY)
    gone = engine.make_sequence("gone", prompts[4], SamplingParams(max_tokens=50, temperature=0))
    engine.add(keep)
    engine.add(gone)
    engine.step()
    engine.step()
    assert gone.in_prefill and gone.pages, "aborted mid-prefill"
    engine.abort(gone)
    assert gone.finished and gone.finish_reason is FinishReason.ABORT and not gone.pages
    while not keep.output_ids:
        engine.step()
    late = engine.make_sequence("late", prompts[3], SamplingParams(max_tokens=50, temperature=0))
    engine.add(late)
    while len(late.output_ids) < 2:
        engine.step()
    held = engine.scheduler.pages_held_by_requests
    engine.abort(late)  # aborted while decoding
    assert engine.scheduler.pages_held_by_requests < held
    while engine.scheduler.has_work():
        engine.step()
    check_accounting(engine)
    assert engine.flush_cache() and engine.pool.num_used == 0


# -- the async API: stop strings and aborts ---------------------------------------------------------
async def collect(engine: AsyncEngine, prompt: list[int], params: SamplingParams) -> tuple[str, list]:
    chunks = [c async for c in engine.generate(prompt, params)]
    return "".join(c.text for c in chunks), chunks


async def test_stop_strings_and_cached_tokens_through_the_async_engine(
    smollm2_engine_factory, prompts, reference
) -> None:
    llm = smollm2_engine_factory()
    full_text = llm.tokenizer.decode(reference[3])
    stop = full_text[len(full_text) // 2 : len(full_text) // 2 + 4]
    assert stop.strip() and full_text.find(stop) > 0
    engine = AsyncEngine(llm)
    engine.start()
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, stop=(stop,))
        text, chunks = await collect(engine, prompts[3], params)
        assert text == full_text[: full_text.find(stop)]
        assert chunks[-1].finished and chunks[-1].finish_reason == "stop"
        assert chunks[-1].cached_tokens == 0
        text, chunks = await collect(engine, prompts[3], GREEDY)
        assert text == full_text and chunks[-1].finish_reason == "length"
        assert chunks[-1].cached_tokens == (len(prompts[3]) - 1) // 16 * 16
        assert chunks[-1].completion_tokens == MAX_TOKENS
        # a caller that stops listening aborts its request and frees its pages
        stream = engine.generate(prompts[4], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(200):
            if not llm.scheduler.has_work():
                break
            await asyncio.sleep(0.05)
    finally:
        await engine.stop()
    assert not llm.scheduler.has_work()
    check_accounting(llm)


async def test_concurrent_async_requests_equal_the_reference(
    smollm2_engine_factory, prompts, reference
) -> None:
    """Requests arriving together through the async API are batched by the step loop."""
    llm = smollm2_engine_factory(max_batch_tokens=48)
    engine = AsyncEngine(llm)
    engine.start()
    try:
        results = await asyncio.gather(*(collect(engine, p, GREEDY) for p in prompts))
    finally:
        await engine.stop()
    for (text, chunks), ref in zip(results, reference, strict=True):
        assert [t for c in chunks for t in c.token_ids] == ref
        assert text == llm.tokenizer.decode(ref)
        assert chunks[-1].finish_reason == "length" and chunks[-1].prompt_tokens > 0
    check_accounting(llm)
