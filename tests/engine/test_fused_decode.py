"""The fused CPU decode step (engine/models/fused_decode.cpp): every layer of a pure decode step in one
C++ call, computing bitwise what the Python layer loop computes, with every kind of projection the
loader builds (dense bf16, int4 and int8 weight-only, oneDNN-packed fp32), taken only by pure decode
steps, and an engine that decodes in Python where the extension cannot build."""

from __future__ import annotations

import pytest
import torch

import engine.models.fused_decode as fused_decode
from cache.api.sampling import SamplingParams
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.loader import load_model
from engine.model_runner import allocate_kv
from engine.models.attention import AttentionBatch, DecodeGroup, PrefillSegment
from engine.models.llama import LayerPlan
from engine.models.quant_linear import quantized_kernels_available

pytestmark = pytest.mark.skipif(fused_decode.load_extension() is None, reason="the extension did not build")

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


def decode_batch(lengths: list[int], *, prefill: int = 0) -> tuple[torch.Tensor, AttentionBatch]:
    """Positions and attention of one step: a decode row for each of ``lengths`` (keys so far,
    the new one included, in scattered slots), then a prefill chunk of ``prefill`` fresh tokens."""
    gen = torch.Generator().manual_seed(sum(lengths) + prefill)
    order = torch.randperm(4096, generator=gen)
    width, start, rows = max(lengths), 0, []
    padded = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), 1, 1, width, dtype=torch.bool)
    for r, n in enumerate(lengths):
        padded[r, :n], mask[r, ..., :n] = order[start : start + n], True
        rows.append(padded[r, n - 1])
        start += n
    slot_mapping = torch.stack(rows)
    prefills = []
    if prefill:
        fresh = order[start : start + prefill]
        prefills.append(PrefillSegment(len(lengths), prefill, fresh, None))
        slot_mapping = torch.cat([slot_mapping, fresh])
    group = DecodeGroup(
        torch.arange(len(lengths)),
        padded,
        None if len(set(lengths)) == 1 else mask,
        all_rows=not prefill,
    )
    positions = torch.tensor([n - 1 for n in lengths] + list(range(prefill)))
    return positions, AttentionBatch(slot_mapping, prefills, group)


@pytest.mark.parametrize("lengths", [[40], [300, 7], [1, 64, 129]], ids=["b1", "b2-ragged", "b3-ragged"])
@torch.inference_mode()
def test_the_fused_step_is_bitwise_the_python_step(loaded, lengths: list[int]) -> None:
    model = loaded.model
    assert model.fused_decode
    positions, batch = decode_batch(lengths)
    ids = torch.randint(
        100, model.config.vocab_size, (len(lengths),), generator=torch.Generator().manual_seed(1)
    )
    results = {}
    for fused in (True, False):
        kv = allocate_kv(model, 256, 16, loaded.dtype)
        gen = torch.Generator().manual_seed(2)  # the same cached keys and values for both paths
        kv.k.copy_(torch.randn(kv.k.shape, generator=gen))
        kv.v.copy_(torch.randn(kv.v.shape, generator=gen))
        model.fused_decode = fused
        try:
            results[fused] = model(ids, positions, batch, kv, torch.arange(len(lengths))), kv
        finally:
            model.fused_decode = True
    (logits, kv), (expected, expected_kv) = results[True], results[False]
    assert torch.equal(logits, expected)
    assert torch.equal(kv.k, expected_kv.k) and torch.equal(kv.v, expected_kv.v)  # the same K/V written


@torch.inference_mode()
def test_only_pure_decode_steps_take_the_fused_path(smollm2_model, monkeypatch) -> None:
    model, calls = smollm2_model.model, []
    original = LayerPlan.forward

    def counting(self, *args):
        calls.append(self.index)
        return original(self, *args)

    monkeypatch.setattr(LayerPlan, "forward", counting)
    kv = allocate_kv(model, 256, 16, torch.float32)
    layers = model.config.num_layers
    for lengths, prefill, python_layers in [([9, 20], 0, 0), ([9, 20], 5, layers), ([], 5, layers)]:
        calls.clear()
        positions, batch = decode_batch(lengths or [1], prefill=prefill)
        if not lengths:
            batch.decode, batch.slot_mapping, positions = None, batch.slot_mapping[1:], positions[1:]
        ids = torch.full(positions.shape, 200)
        model(ids, positions, batch, kv)
        assert len(calls) == python_layers, (lengths, prefill)


def generate(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    seqs = [engine.make_sequence(f"s{i}", p, params) for i, p in enumerate(prompts)]
    for s in seqs:
        engine.add(s)
    while engine.scheduler.has_work():
        engine.step()
    return [s.output_ids for s in seqs]


def test_an_engine_decodes_the_same_tokens_with_and_without_it(smollm2_gguf_path) -> None:
    config = EngineConfig(model=str(smollm2_gguf_path), dtype="bfloat16", kv_cache_tokens=1024)
    engine = LLMEngine(config)
    prompts = [[1, 2, 3, 4, 5], list(range(300, 340)), list(range(700, 703))]
    fused = generate(engine, prompts)
    engine.model.fused_decode = False
    engine.flush_cache()
    assert generate(engine, prompts) == fused


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
