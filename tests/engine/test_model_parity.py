"""Our Llama-family model against Hugging Face transformers on the same weights, in fp32.

Every comparison is over the logits of every position, computed two ways on our side:
- one full-sequence prefill, and
- incrementally through the paged KV cache as the engine runs it: a prefix, then prefill chunks on
  top of the cached prefix, then single-token decode steps, with two sequences packed into the
  same steps (one decoding while the other prefills) and scattered, interleaved page tables;
with the plain ``nn.Linear`` layers and with the oneDNN pre-packed ones (``pack_for_cpu``).

The error is ``max |ours - hf| / max |hf|`` over all logits. Measured on this project's 2-core
x86 CPU: tiny random models 2-4e-7; SmolLM2-135M 1.1e-6 full / 1.4e-6 incremental with plain
linears and 2.5e-6 / 3.3e-6 with oneDNN-packed ones (max abs diff 1.4e-4 on logits of magnitude
up to 42). ``REL_TOL`` leaves ~6x headroom for other CPUs' accumulation order, while any real
mistake (RoPE layout, mask, page slot, GQA head mapping) gives errors of 1e-2 and more.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cache.api.sampling import SamplingParams
from engine.kv.page_pool import PagePool
from engine.model_runner import ModelRunner, allocate_kv
from engine.models.config import ModelConfig
from engine.models.cpu_linear import packing_available
from engine.models.llama import LlamaForCausalLM
from engine.scheduler import Batch, ScheduledChunk
from engine.sequence import Sequence
from engine.weights import Checkpoint, load_checkpoint

transformers = pytest.importorskip("transformers")

REL_TOL = 2e-5
CPU_FP32_PACKING = packing_available(torch.device("cpu"), torch.float32)
PACKED = [False, pytest.param(True, marks=pytest.mark.skipif(not CPU_FP32_PACKING, reason="no oneDNN"))]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def build_ours(config: ModelConfig, tensors, packed: bool) -> LlamaForCausalLM:
    model = LlamaForCausalLM(config).float().eval()
    model.load_weights(tensors)
    if packed:
        model.pack_for_cpu()
    return model


@torch.inference_mode()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()  # [T, V]


# -- running our model through the paged KV cache --------------------------------------------------
@dataclass
class Plan:
    """Steps of (sequence index, tokens to compute) to run the prompts through, in order."""

    prompts: list[list[int]]
    steps: list[list[tuple[int, int]]]


def run_paged(model: LlamaForCausalLM, plan: Plan, page_size: int, seed: int = 0) -> list[torch.Tensor]:
    """Run ``plan`` through the real ``ModelRunner.prepare`` and the paged KV cache; returns the
    logits of every position of every prompt, gathered from the steps that computed them."""
    num_pages = sum(-(-len(p) // page_size) for p in plan.prompts) + 3
    order = list(range(num_pages))
    random.Random(seed).shuffle(order)  # scattered page tables, sequences interleaved in the pool
    pool = PagePool(num_pages)
    pool._free.clear()
    pool._free.extend(order)
    runner = ModelRunner(model, allocate_kv(model, num_pages, page_size, torch.float32), page_size)
    seqs = [Sequence(f"s{i}", p, SamplingParams(max_tokens=1)) for i, p in enumerate(plan.prompts)]
    logits: list[list[torch.Tensor]] = [[] for _ in seqs]
    for step in plan.steps:
        chunks = []
        for i, n in step:
            seq = seqs[i]
            need = -(-(seq.num_computed + n) // page_size) - len(seq.pages)
            seq.pages.extend(pool.alloc(max(need, 0)))
            chunks.append(ScheduledChunk(seq, seq.num_computed, n))
        input_ids, positions, attn, _, _ = runner.prepare(Batch(chunks))
        out = model(input_ids, positions, attn, runner.kv)  # every row's logits: [T, V]
        row = 0
        for chunk in chunks:
            logits[seqs.index(chunk.seq)].append(out[row : row + chunk.length])
            chunk.seq.num_computed += chunk.length
            row += chunk.length
    for seq in seqs:
        assert seq.num_computed == len(seq.prompt_ids), "the plan must cover every prompt"
    return [torch.cat(parts) for parts in logits]


def incremental_plan(a: list[int], b: list[int], prefix: int, chunks: list[int], decodes: int) -> Plan:
    """``a``: a prefix, prefill chunks, then ``decodes`` single-token steps. ``b`` runs beside
    ``a``'s decodes: two prefill chunks packed with a decode, then single-token steps of its own
    (a decode group of two sequences with different context lengths)."""
    b_steps = [11, len(b) - 11 - 4, 1, 1, 1, 1]
    assert prefix + sum(chunks) + decodes == len(a) and decodes >= len(b_steps) and b_steps[1] > 1
    steps: list[list[tuple[int, int]]] = [[(0, prefix)]] + [[(0, n)] for n in chunks]
    for k in range(decodes):
        steps.append([(0, 1)] + ([(1, b_steps[k])] if k < len(b_steps) else []))
    return Plan([a, b], steps)


def check_against_hf(ours: LlamaForCausalLM, hf, a: list[int], b: list[int], plan: Plan, page_size: int):
    ref_a, ref_b = hf_logits(hf, a), hf_logits(hf, b)
    errors = {}
    # 1. one full prefill (no cache reads: the fresh K/V path)
    full = run_paged(ours, Plan([a], [[(0, len(a))]]), page_size)[0]
    errors["full"] = rel_err(full, ref_a)
    # 2. incrementally through the paged cache
    inc_a, inc_b = run_paged(ours, plan, page_size)
    errors["incremental"] = max(rel_err(inc_a, ref_a), rel_err(inc_b, ref_b))
    # the argmax (what greedy decoding sees) agrees wherever HF's top-2 margin is not a near-tie
    for ours_l, ref_l in ((full, ref_a), (inc_a, ref_a), (inc_b, ref_b)):
        top2 = ref_l.topk(2).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-3 * ref_l.abs().max()
        assert torch.equal(ours_l.argmax(-1)[clear], ref_l.argmax(-1)[clear])
    print(f"relative logit error vs HF: {errors}")
    assert max(errors.values()) < REL_TOL, errors
    return errors


# -- tiny random models saved as safetensors ---------------------------------------------------------
TINY = {
    "llama-tied": ("llama", True),
    "llama-untied": ("llama", False),
    "qwen2-bias": ("qwen2", False),
}


def save_tiny(tmp_path: Path, arch: str, tied: bool):
    kwargs = dict(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    torch.manual_seed(0)
    hf = model_cls(config_cls(**kwargs)).float().eval()
    with torch.no_grad():  # random init leaves biases at zero and norms at one: perturb them
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("packed", PACKED)
@pytest.mark.parametrize("kind", list(TINY))
def test_tiny_random_model_matches_hf(tmp_path: Path, kind: str, packed: bool) -> None:
    arch, tied = TINY[kind]
    hf = save_tiny(tmp_path, arch, tied)
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.config.architecture == arch and checkpoint.config.attention_bias == (arch == "qwen2")
    ours = build_ours(checkpoint.config, checkpoint.tensors(), packed)
    rng = random.Random(1)
    a = [rng.randrange(160) for _ in range(70)]
    b = [rng.randrange(160) for _ in range(30)]
    plan = incremental_plan(a, b, prefix=21, chunks=[13, 4, 1, 19], decodes=12)
    check_against_hf(ours, hf, a, b, plan, page_size=4)


# -- the real SmolLM2 (GGUF, dequantized) ------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_pair(smollm2_checkpoint: Checkpoint):
    """(our model, HF LlamaForCausalLM) built from the same dequantized GGUF tensors."""
    c = smollm2_checkpoint.config
    tensors = dict(smollm2_checkpoint.tensors())
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings,
        attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(hf_config).float().eval()
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if c.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ours = build_ours(c, tensors.items(), packed=False)
    del tensors
    return ours, hf


@pytest.fixture(scope="module")
def smollm2_prompts(smollm2_checkpoint: Checkpoint) -> tuple[list[int], list[int]]:
    from cache.prompt.tokenizer import Tokenizer

    tok = Tokenizer.from_source(smollm2_checkpoint.tokenizer_source)
    text = (
        "The radix tree stores every cached prompt prefix as a path of KV pages. When a new request "
        "arrives, the engine walks the tree token by token and reuses every page it finds, so only "
        "the rest of the prompt needs a forward pass. Under memory pressure the least recently used "
        "leaves are evicted first, but never a page that a running request still reads. "
    )
    a = tok.encode(text * 2)[:150]
    b = tok.encode(
        "Write a haiku about paged attention, radix trees and prefix caching on a small CPU server."
    )
    assert len(a) == 150 and len(b) > 17
    return a, b


@pytest.mark.parametrize("packed", PACKED)
@pytest.mark.slow
def test_smollm2_matches_hf(smollm2_pair, smollm2_prompts, packed: bool) -> None:
    ours, hf = smollm2_pair
    if packed:
        ours = copy.deepcopy(ours)
        ours.pack_for_cpu()
    a, b = smollm2_prompts
    # prefix 37 (not page-aligned), chunks that cross page boundaries, then 10 decode steps
    plan = incremental_plan(a, b, prefix=37, chunks=[16, 50, 1, 36], decodes=10)
    check_against_hf(ours, hf, a, b, plan, page_size=16)
