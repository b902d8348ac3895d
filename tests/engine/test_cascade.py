"""Cascade attention: decodes sharing a cached prefix attend to it once, merged by log-sum-exp.

The merge must give what each row attending to all its keys gives (fp32, to float rounding), and the
engine must take the cascade when at least ``ModelRunner.cascade_min`` decoding sequences share at least
that many tokens of cached pages, with the same greedy outputs as without it (fp32), in the fused decode
step and on the Python path.
"""

from __future__ import annotations

import random

import pytest
import torch

import engine.models.attention as attention
from cache.api.sampling import SamplingParams
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.model_runner import CASCADE_MIN, FUSED_CASCADE_MIN
from engine.models.attention import DecodeGroup


@torch.inference_mode()
def test_cascade_equals_attending_to_all_keys() -> None:
    torch.manual_seed(0)
    slots, KVH, G, D = 4096, 2, 3, 16
    k_cache, v_cache = torch.randn(slots, KVH, D), torch.randn(slots, KVH, D)
    order = torch.randperm(slots)  # scattered, as pages are
    prefix = order[:300]
    own = [order[300:307], order[400:433], order[500:501]]  # each row's keys after the prefix, ragged
    q = torch.randn(len(own), KVH, G, D)

    def group(rows_slots: list[torch.Tensor], prefix_slots: torch.Tensor | None) -> DecodeGroup:
        width = max(len(s) for s in rows_slots)
        padded = torch.zeros(len(rows_slots), width, dtype=torch.long)
        mask = torch.zeros(len(rows_slots), 1, 1, width, dtype=torch.bool)
        for r, s in enumerate(rows_slots):
            padded[r, : len(s)], mask[r, ..., : len(s)] = s, True
        if prefix_slots is not None:  # the cascade takes the mask as an additive bias (as prepare builds it)
            mask = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
        return DecodeGroup(torch.arange(len(rows_slots)), padded, mask, True, prefix_slots)

    full = attention._decode(q, k_cache, v_cache, group([torch.cat([prefix, s]) for s in own], None))
    cascade = attention._decode(q, k_cache, v_cache, group(own, prefix))
    torch.testing.assert_close(cascade, full, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["python", "fused-decode"])
def test_engine_cascades_shared_prefixes_with_the_same_greedy_outputs(
    smollm2_engine_factory, smollm2_model, monkeypatch, fused: bool
) -> None:
    python_calls: list[int] = []
    original = attention._cascade

    def counting(q, k_cache, v_cache, prefix_slots, *rest):
        python_calls.append(len(prefix_slots))
        return original(q, k_cache, v_cache, prefix_slots, *rest)

    monkeypatch.setattr(attention, "_cascade", counting)
    rng = random.Random(0)
    min_rows, min_tokens = FUSED_CASCADE_MIN if fused else CASCADE_MIN
    prefix = [rng.randrange(100, 40000) for _ in range(min_tokens + 44)]
    lengths = [5, 17, 30, 9, 2, 21, 11, 6][:min_rows]  # own tokens after the prefix: ragged
    prompts = [prefix + [rng.randrange(100, 40000) for _ in range(n)] for n in lengths]
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    shared_steps: list[int] = []  # the prefix tokens of each step that attends to one

    def run(cascade: bool) -> list[list[int]]:
        engine: LLMEngine = smollm2_engine_factory(kv_cache_tokens=4096)
        monkeypatch.setattr(engine.model, "fused_decode", fused)
        engine.runner.cascade = cascade
        engine.runner.cascade_min = FUSED_CASCADE_MIN if fused else CASCADE_MIN
        prepare = engine.runner.prepare

        def recording(batch):
            prepared = prepare(batch)
            if prepared[2].decode is not None and prepared[2].decode.prefix_slots is not None:
                shared_steps.append(len(prepared[2].decode.prefix_slots))
            return prepared

        monkeypatch.setattr(engine.runner, "prepare", recording)
        first = engine.make_sequence("warm", prefix, SamplingParams(max_tokens=1, temperature=0))
        engine.add(first)  # caches the shared prefix's pages
        while engine.scheduler.has_work():
            engine.step()
        seqs = [engine.make_sequence(f"s{i}", p, greedy) for i, p in enumerate(prompts)]
        for s in seqs:
            engine.add(s)
        while engine.scheduler.has_work():
            engine.step()
        return [s.output_ids for s in seqs]

    plain = run(cascade=False)
    assert not shared_steps and not python_calls
    assert run(cascade=True) == plain
    # the batched decode steps, over the prefix's whole cached pages: in Python, every layer of them
    page = EngineConfig().page_size
    assert shared_steps and set(shared_steps) == {len(prefix) // page * page}
    if fused:
        assert not python_calls
    else:
        assert len(python_calls) == len(shared_steps) * smollm2_model.model.config.num_layers
