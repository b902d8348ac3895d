"""GGUF checkpoints (llama.cpp format): metadata -> ModelConfig, tensors dequantized to HF names and layout."""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf.quants import dequantize

from cache.prompt.gguf_meta import GGUFFile, open_gguf
from cache.prompt.model_files import WeightLoadError
from engine.models.config import ModelConfig
from engine.weights import Checkpoint
from engine.weights.quant import GGUF_Q4_TYPES, GroupQuant4

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# Types gguf.quants can dequantize to float. Integer tensors (I8..I64) and the Q8_1/Q8_K types, which
# llama.cpp only uses for activations, have no meaning as weights here.
SUPPORTED_TYPES = frozenset(
    {
        QType.F32,
        QType.F16,
        QType.BF16,
        QType.Q4_0,
        QType.Q4_1,
        QType.Q5_0,
        QType.Q5_1,
        QType.Q8_0,
        QType.Q2_K,
        QType.Q3_K,
        QType.Q4_K,
        QType.Q5_K,
        QType.Q6_K,
        QType.IQ4_NL,
        QType.IQ4_XS,
    }
)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        raise WeightLoadError(f"unexpected GGUF tensor {gguf_name!r} (not part of a llama/qwen2 decoder)")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"


def config_from_gguf(meta: GGUFFile) -> ModelConfig:
    arch = meta.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise WeightLoadError(
            f"{meta.path}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    rope_scaling = meta.arch_get("rope.scaling.type", "none")
    if rope_scaling != "none" or any(t.name == "rope_freqs.weight" for t in meta.reader.tensors):
        raise WeightLoadError(f"{meta.path}: RoPE scaling ({rope_scaling}) is not supported")
    hidden = int(meta.arch_get("embedding_length"))
    num_heads = int(meta.arch_get("attention.head_count"))
    tensors = {t.name: t for t in meta.reader.tensors}
    if "token_embd.weight" not in tensors:
        raise WeightLoadError(f"{meta.path}: no token_embd.weight tensor")
    eos = meta.get("tokenizer.ggml.eos_token_id", None)
    eot = meta.get("tokenizer.ggml.eot_token_id", None)  # end-of-turn, e.g. <|im_end|> when eos differs
    bos = meta.get("tokenizer.ggml.bos_token_id", None)
    return ModelConfig(
        architecture=arch,
        # The embedding's row count is what the model needs; {arch}.vocab_size is often absent.
        vocab_size=int(tensors["token_embd.weight"].shape[1]),
        hidden_size=hidden,
        intermediate_size=int(meta.arch_get("feed_forward_length")),
        num_layers=int(meta.arch_get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(meta.arch_get("attention.head_count_kv", num_heads)),
        head_dim=int(meta.arch_get("attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(meta.arch_get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.arch_get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta.arch_get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in (eos, eot) if i is not None)),
    )


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's ``LlamaModel.permute`` of q/k rows.

    HF Llama rotates the two halves of each head (rotate_half); llama.cpp's converter reorders each
    head's rows so that pairs (i, i + head_dim/2) become adjacent for its interleaved RoPE:
    ``w.reshape(H, 2, D/2, ...).swapaxes(1, 2)``. The inverse reads the rows as [H, D/2, 2].
    """
    # weight: [H * D, ...] (a weight [H*D, hidden] or a bias [H*D])
    head_half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, head_half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def rotary_permuted_heads(config: ModelConfig, gguf_name: str) -> int | None:
    """Heads whose rows llama.cpp permuted in this tensor (llama q/k), else None.

    qwen2 uses NEOX-style RoPE in llama.cpp, so its converter leaves q/k rows alone."""
    if config.architecture == "llama" and ".attn_q." in gguf_name:
        return config.num_heads
    if config.architecture == "llama" and ".attn_k." in gguf_name:
        return config.num_kv_heads
    return None


def iter_gguf_tensors(meta: GGUFFile, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    for info in meta.reader.tensors:
        name = hf_name(info.name)
        # info.shape is in ggml order (fastest dimension first); torch wants the reverse.
        shape = tuple(int(d) for d in reversed(info.shape))
        weight = dequantize(info.data, info.tensor_type).reshape(shape)
        if (heads := rotary_permuted_heads(config, info.name)) is not None:
            weight = unpermute_rotary_rows(weight, heads)
        # Copy: the dequantized array may be a read-only view of the memory-mapped file.
        yield name, torch.from_numpy(np.array(weight, dtype=np.float32, copy=True))


def iter_gguf_group_quantized(meta: GGUFFile, config: ModelConfig) -> Iterator[tuple[str, GroupQuant4]]:
    """The file's Q4_0/Q4_1 tensors as their own 4-bit groups (HF names and row order); others skipped."""
    for info in meta.reader.tensors:
        if info.tensor_type not in GGUF_Q4_TYPES:
            continue
        shape = tuple(int(d) for d in reversed(info.shape))
        assert len(shape) == 2, f"{info.name}: a 4-bit tensor that is not a matrix"
        quant = GroupQuant4.from_gguf_blocks(info.data, info.tensor_type, (shape[0], shape[1]))
        if (heads := rotary_permuted_heads(config, info.name)) is not None:
            quant = quant.rows(unpermute_rotary_rows(np.arange(shape[0]), heads))
        yield hf_name(info.name), quant


def open_gguf_checkpoint(path: Path) -> Checkpoint:
    meta = open_gguf(path)
    config = config_from_gguf(meta)
    for info in meta.reader.tensors:
        hf_name(info.name)  # fail on foreign tensors now, not halfway through loading
        if info.tensor_type not in SUPPORTED_TYPES:
            raise WeightLoadError(
                f"{path}: tensor {info.name} has unsupported type {info.tensor_type.name}; "
                f"supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))}"
            )
    return Checkpoint(
        config=config,
        tokenizer_source=meta,
        path=path,
        read_tensors=partial(iter_gguf_tensors, meta, config),
        read_group_quantized=partial(iter_gguf_group_quantized, meta, config),
    )
