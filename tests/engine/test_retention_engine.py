"""Retention pins in the real engine (SmolLM2, fp32): a request's ``kv_pin`` holds its prompt's prefix
through an eviction storm that takes an unpinned prompt of the same size, until the pin expires."""

from __future__ import annotations

import random

import pytest

from cache.api.kv_fields import KVPin
from cache.api.sampling import SamplingParams
from engine.engine import LLMEngine
from engine.sequence import Sequence

pytestmark = pytest.mark.slow

ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
PAGE = 16


def served(engine: LLMEngine, seq: Sequence) -> Sequence:
    engine.add(seq)
    while engine.scheduler.has_work():
        engine.step()
    return seq


def cached_on_return(engine: LLMEngine, prompt: list[int], salt: str = "") -> int:
    """Prompt tokens a request for ``prompt`` finds cached."""
    return served(engine, engine.make_sequence("again", prompt, ONE_TOKEN, salt)).num_cached_prompt


def test_a_pinned_prompt_survives_the_storm_that_evicts_its_unpinned_twin(smollm2_engine_factory) -> None:
    engine = smollm2_engine_factory(kv_cache_tokens=24 * PAGE)  # 24 pages; a namespace may pin 3
    rng = random.Random(7)
    vocab = engine.info.vocab_size

    def prompt(length: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(length)]

    pinned, unpinned = prompt(3 * PAGE + 3), prompt(3 * PAGE + 3)
    now = [0.0]
    engine.pins.clock = lambda: now[0]
    served(engine, engine.make_sequence("p", pinned, ONE_TOKEN, "tenant", (KVPin(60.0),)))
    served(engine, engine.make_sequence("u", unpinned, ONE_TOKEN, "tenant"))
    stats = engine.stats()
    assert (stats.pages_pinned, stats.num_pins) == (3, 1)
    for i in range(7):  # 7 x 4 pages through a 24-page pool
        served(engine, engine.make_sequence(f"storm{i}", prompt(4 * PAGE), ONE_TOKEN, "tenant"))
    assert cached_on_return(engine, unpinned, "tenant") == 0
    assert cached_on_return(engine, pinned, "tenant") == 3 * PAGE
    assert cached_on_return(engine, pinned, "other") == 0  # the pin is the tenant's alone

    now[0] += 61  # expired: the next step releases it, and LRU takes it like any other
    for i in range(7):
        served(engine, engine.make_sequence(f"late{i}", prompt(4 * PAGE), ONE_TOKEN, "tenant"))
    assert engine.stats().num_pins == 0
    assert cached_on_return(engine, pinned, "tenant") == 0


def test_a_pin_holds_the_asked_prefix_and_flush_releases_it(smollm2_engine_factory) -> None:
    engine = smollm2_engine_factory(kv_cache_tokens=24 * PAGE)
    prompt = list(range(500, 500 + 3 * PAGE + 9))
    served(engine, engine.make_sequence("p", prompt, ONE_TOKEN, "", (KVPin(60.0, tokens=2 * PAGE + 5),)))
    assert engine.stats().pages_pinned == 2
    assert engine.flush_cache()
    assert engine.stats().num_pins == 0 and engine.pool.num_used == 0
