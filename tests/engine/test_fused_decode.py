"""The fused CPU decode step (engine/models/fused_decode.cpp): every layer of a pure decode step in one
C++ call, computing what the Python layer loop computes (to float rounding: its norms and attention
sum in other orders) with every kind of projection the loader builds (dense bf16, int4 and int8
weight-only, oneDNN-packed fp32) and with a shared prefix (cascade), taken only by pure decode steps,
the same greedy tokens as the Python path, and an engine that decodes in Python where the extension
cannot build or does not take the model."""

from __future__ import annotations

import inspect
import itertools
import json
import textwrap

import pytest
import torch
import torch.nn.functional as F

import engine.models.fused_decode as fused_decode
from cache.api.sampling import SamplingParams
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.kv.page_pool import PagePool
from engine.loader import load_model
from engine.model_runner import FUSED_CASCADE_MIN, ModelRunner, allocate_kv
from engine.models.attention import KVCache
from engine.models.llama import LayerPlan
from engine.models.quant_linear import quantized_kernels_available
from engine.scheduler import Batch, ScheduledChunk
from engine.sequence import Sequence

pytestmark = [  # every test here loads the real model
    pytest.mark.slow,
    pytest.mark.skipif(fused_decode.load_extension() is None, reason="the extension did not build"),
]

MODES = [("float32", "float"), ("bfloat16", "float"), ("bfloat16", "int4"), ("bfloat16", "int8")]


@pytest.fixture(scope="module", params=MODES, ids=lambda m: "-".join(m))
def loaded(request, smollm2_gguf_path, smollm2_model):
    dtype, weights = request.param
    if weights != "float" and not quantized_kernels_available(torch.device("cpu")):
        pytest.skip("no CPU weight-only kernels in this torch")
    if dtype == "float32":
        return smollm2_model  # the session's model: fp32, oneDNN-packed projections
    # quantized_max_rows=2: batches of 1 and 2 take the quantized kernels, 3 the dense copies
    return load_model(
        EngineConfig(model=str(smollm2_gguf_path), dtype=dtype, weights=weights, quantized_max_rows=2)
    )


def text(tokenizer, lengths: list[int]) -> list[list[int]]:
    ids = tokenizer.encode(inspect.getsource(json.decoder) + inspect.getsource(textwrap))
    assert len(ids) >= sum(lengths)
    starts = itertools.accumulate([0, *lengths])
    return [ids[s : s + n] for s, n in zip(starts, lengths, strict=False)]


@torch.inference_mode()
def decode_logits(
    loaded, prompts: list[list[int]], shared: int = 0
) -> tuple[dict[bool, tuple[torch.Tensor, KVCache]], torch.Tensor]:
    """Each prompt but its last token prefilled (the Python path), then one decode step of every
    prompt's last token, fused and not, from the same KV: ``{fused: (logits [B, V], KV after)}``,
    and the slots that step wrote. With ``shared``, the prompts' first ``shared`` tokens (whole pages)
    are one copy in the KV pool, cached once, and the step attends to them once (cascade)."""
    model, page_size = loaded.model, 16
    assert shared % page_size == 0
    own = [-(-(len(p) - shared) // page_size) for p in prompts]
    pool = PagePool(shared // page_size + sum(own))
    runner = ModelRunner(model, allocate_kv(model, pool.num_free, page_size, loaded.dtype), page_size)
    runner.cascade_min = (2, shared or 1)  # a cascade for this step when the prompts share pages
    prefix_pages, seqs = pool.alloc(shared // page_size), []
    for i, (prompt, pages) in enumerate(zip(prompts, own, strict=True)):
        seq = Sequence(f"s{i}", prompt, SamplingParams(max_tokens=1))
        seq.pages = prefix_pages + pool.alloc(pages)
        start = shared if i else 0  # the first prompt caches the shared pages
        model(*runner.prepare(Batch([ScheduledChunk(seq, start, len(prompt) - 1 - start)]))[:3], runner.kv)
        seqs.append(seq)
    step = runner.prepare(
        Batch([ScheduledChunk(s, len(p) - 1, 1) for s, p in zip(seqs, prompts, strict=True)])
    )
    assert step[2].decode.all_rows
    assert (step[2].decode.prefix_slots is not None) == bool(shared)
    cached = KVCache(runner.kv.k.clone(), runner.kv.v.clone())
    results = {}
    for fused in (True, False):
        kv = KVCache(cached.k.clone(), cached.v.clone())
        model.fused_decode = fused
        try:
            results[fused] = model(*step[:3], kv, step[3]), kv
        finally:
            model.fused_decode = True
    return results, step[2].slot_mapping


SHARED = 272  # a shared prompt's tokens, whole pages: cascade attention


@pytest.mark.parametrize(
    ("lengths", "shared"),
    [
        ([40], 0),
        ([300], 0),
        ([300, 7], 0),
        ([41, 64, 129], 0),
        ([SHARED + n for n in (3, 30, 17, 1, 9)], SHARED),
    ],
    ids=["b1", "b1-long", "b2-ragged", "b3-ragged", "b5-shared-prefix"],
)
def test_the_fused_step_computes_what_the_python_step_does(
    loaded, lengths: list[int], shared: int, smollm2_model
) -> None:
    assert loaded.model.fused_decode
    prompts = text(loaded.tokenizer, lengths)
    if shared:  # every prompt starts with the first one's first `shared` tokens
        prompts = [prompts[0][:shared] + p[shared:] for p in prompts]
    results, written = decode_logits(loaded, prompts, shared)
    (logits, kv), (expected, expected_kv) = results[True], results[False]
    # The same next token, or in bf16 a near-tie: one the Python path scores within a rounding of its best.
    chosen = expected.gather(-1, logits.argmax(-1, keepdim=True)).squeeze(-1)
    assert torch.all(chosen >= expected.max(-1).values - (0 if loaded.dtype == torch.float32 else 0.25))
    if loaded.dtype == torch.float32:
        # The same arithmetic summed in other orders: logits (~35 at most here) within 1e-3 (measured
        # 5e-5), the K/V written within 1e-4 (measured 1.3e-5).
        atol, kv_atol = 1e-3, 1e-4
    else:
        # bf16 rounds each path's sums its own way: no closer to each other than either is to fp32.
        # Measured against the fp32 model's logits, both err alike (max 0.3-1.5, KL 2e-4 to 1e-2,
        # the fused path's KL at most 1.6x the Python path's); logits within 0.82 of each other.
        ref = decode_logits(smollm2_model, prompts, shared)[0][False][0]

        def kl(ours: torch.Tensor) -> float:
            return F.kl_div(ours.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")

        assert kl(logits) <= 2 * kl(expected) + 2e-3
        atol, kv_atol = 1.5, 0.25
    torch.testing.assert_close(logits, expected, rtol=0, atol=atol)
    for ours, theirs in ((kv.k, expected_kv.k), (kv.v, expected_kv.v)):  # every layer's new K/V (|x| < ~20)
        torch.testing.assert_close(ours[:, written], theirs[:, written], rtol=0, atol=kv_atol)
        untouched = torch.ones(ours.shape[1], dtype=torch.bool)
        untouched[written] = False
        assert torch.equal(ours[:, untouched], theirs[:, untouched])  # nothing else written


def test_only_pure_decode_steps_take_the_fused_path(smollm2_engine_factory, monkeypatch) -> None:
    engine = smollm2_engine_factory(max_batch_tokens=64)
    assert engine.runner.cascade_min == FUSED_CASCADE_MIN
    python_layers, steps = [], []
    plan_forward, prepare = LayerPlan.forward, engine.runner.prepare

    def counting(self, *args):
        python_layers.append(self.index)
        return plan_forward(self, *args)

    def recording(batch):
        prepared = prepare(batch)
        decode = prepared[2].decode
        steps.append("decode" if decode is not None and decode.all_rows else "mixed")
        return prepared

    monkeypatch.setattr(LayerPlan, "forward", counting)
    monkeypatch.setattr(engine.runner, "prepare", recording)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine.add(engine.make_sequence("a", list(range(200, 220)), params))
    layers, seen = engine.model.config.num_layers, []
    while engine.scheduler.has_work():
        if len(steps) == 3:  # "a" decodes; "b"'s 150-token prompt joins in 64-token chunks
            engine.add(engine.make_sequence("b", list(range(300, 450)), params))
        python_layers.clear()
        engine.step()
        seen.append((steps[-1], len(python_layers)))
    assert {kind for kind, _ in seen} == {"decode", "mixed"}
    assert all(n == (0 if kind == "decode" else layers) for kind, n in seen), seen


def generate(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    seqs = [engine.make_sequence(f"s{i}", p, params) for i, p in enumerate(prompts)]
    for s in seqs:
        engine.add(s)
    while engine.scheduler.has_work():
        engine.step()
    return [s.output_ids for s in seqs]


def test_an_engine_decodes_the_same_tokens_with_and_without_it(smollm2_engine_factory) -> None:
    engine = smollm2_engine_factory(kv_cache_tokens=2048)  # fp32: the paths agree to ~1e-6 relative
    prompts = [[1, 2, 3, 4, 5], list(range(300, 640)), list(range(700, 703))]
    outputs = {}
    for fused in (True, False):
        engine.model.fused_decode = fused
        try:  # batched, then the long prompt alone (a batch-1 step splits its keys across threads)
            outputs[fused] = generate(engine, prompts), generate(engine, prompts[1:2])
        finally:
            engine.model.fused_decode = True
        engine.flush_cache()
    assert outputs[True] == outputs[False]


def test_without_the_extension_the_engine_decodes_in_python(
    smollm2_gguf_path, smollm2_model, monkeypatch
) -> None:
    config = EngineConfig(model=str(smollm2_gguf_path), dtype="float32", kv_cache_tokens=1024)
    prompts = [[1, 2, 3, 4, 5], list(range(300, 340))]
    fused = generate(LLMEngine(config, smollm2_model), prompts)
    monkeypatch.setattr(fused_decode, "load_extension", lambda: None)
    loaded = load_model(config)
    assert not loaded.model.fused_decode
    assert generate(LLMEngine(config, loaded), prompts) == fused
    assert not load_model(EngineConfig(model=str(smollm2_gguf_path), fused_decode=False)).model.fused_decode


class Wrapped(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_a_model_it_cannot_take_decodes_in_python(smollm2_gguf_path) -> None:
    loaded = load_model(EngineConfig(model=str(smollm2_gguf_path), dtype="float32", kv_cache_tokens=1024))
    model = loaded.model
    model.layers[3].mlp.down_proj = Wrapped(model.layers[3].mlp.down_proj)  # a kind C++ does not know
    model.replan()
    with pytest.raises(TypeError):
        fused_decode.matmul_spec(model.layers[3].mlp.down_proj)
    engine = LLMEngine(EngineConfig(model=str(smollm2_gguf_path), kv_cache_tokens=1024), loaded)
    assert len(generate(engine, [[1, 2, 3]])[0]) == 12  # decodes (through the Python path)
    assert not model.fused_decode and model._fused is None
