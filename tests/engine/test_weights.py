"""Checkpoint loaders: the real SmolLM2 GGUF, tiny random HF models, and the error paths."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from cache.prompt.model_files import default_model_path
from engine.models.config import ModelConfig
from engine.weights import Checkpoint, WeightLoadError, load_checkpoint
from engine.weights.gguf import unpermute_rotary_rows


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF LlamaForCausalLM parameter shapes for ``config``."""
    d, q, kv, ffn = (
        config.hidden_size,
        config.num_heads * config.head_dim,
        config.num_kv_heads * config.head_dim,
        config.intermediate_size,
    )
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, d),
        "model.norm.weight": (d,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (ffn, d),
            p + "mlp.up_proj.weight": (ffn, d),
            p + "mlp.down_proj.weight": (d, ffn),
        }
        if config.attention_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
            }
    return shapes


@pytest.fixture(scope="module")
def smollm2_tensors(smollm2_checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    return dict(smollm2_checkpoint.tensors())


@pytest.mark.slow
def test_smollm2_config(smollm2_checkpoint: Checkpoint) -> None:
    c = smollm2_checkpoint.config
    assert (c.architecture, c.vocab_size, c.hidden_size, c.intermediate_size) == ("llama", 49152, 576, 1536)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 9, 3, 64)
    assert c.rope_theta == 100000.0 and c.rms_norm_eps == pytest.approx(1e-5)
    assert c.tie_word_embeddings and not c.attention_bias
    assert (c.bos_token_id, c.eos_token_ids, c.max_position_embeddings) == (1, (2,), 8192)


@pytest.mark.slow
def test_smollm2_tensors_complete_and_finite(
    smollm2_checkpoint: Checkpoint, smollm2_tensors: dict[str, torch.Tensor]
) -> None:
    expected = expected_shapes(smollm2_checkpoint.config)
    assert set(smollm2_tensors) == set(expected)
    for name, tensor in smollm2_tensors.items():
        assert tuple(tensor.shape) == expected[name], name
        # numpy: torch.isfinite is ~30x slower on this CPU build
        assert tensor.dtype == torch.float32 and np.isfinite(tensor.numpy()).all(), name
    # Norm weights are F32 in the file and learned around 1, not a dequantization artefact.
    assert smollm2_tensors["model.norm.weight"].abs().mean() > 0.1


def test_unpermute_inverts_llama_cpp_permute() -> None:
    num_heads, head_dim, hidden = 3, 8, 5
    hf = np.random.default_rng(0).standard_normal((num_heads * head_dim, hidden)).astype(np.float32)
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute, as written there:
    permuted = hf.reshape(num_heads, 2, head_dim // 2, hidden).swapaxes(1, 2).reshape(hf.shape)
    np.testing.assert_array_equal(unpermute_rotary_rows(permuted, num_heads), hf)


@pytest.mark.slow
def test_smollm2_matches_reference_gguf_conversion(
    smollm2_checkpoint: Checkpoint, smollm2_tensors: dict[str, torch.Tensor]
) -> None:
    """Names agree with gguf-py's own HF -> GGUF map (what llama.cpp's converter uses), and q/k rows with
    transformers' GGUF loader (``LlamaTensorProcessor``), bit for bit.

    ``AutoModelForCausalLM.from_pretrained(gguf_file=...)`` needs ``accelerate`` and takes ~20 s here,
    so the test calls the piece that un-permutes q/k directly.
    """
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    c = smollm2_checkpoint.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_layers)
    processor = LlamaTensorProcessor(
        config={"num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads}
    )
    reader = smollm2_checkpoint.tokenizer_source.reader  # the already parsed GGUFFile
    gguf_names = {t.name for t in reader.tensors}
    assert {name_map.get_name(n, try_suffixes=(".weight", ".bias")) for n in smollm2_tensors} == gguf_names
    permuted = [t for t in reader.tensors if ".attn_q." in t.name or ".attn_k." in t.name]
    assert len(permuted) == 2 * c.num_layers
    for info in permuted:
        hf_name = next(
            n for n in smollm2_tensors if name_map.get_name(n, try_suffixes=(".weight",)) == info.name
        )
        raw = dequantize(info.data, info.tensor_type)
        expected = np.ascontiguousarray(processor.process(weights=raw, name=info.name).weights)
        assert not np.array_equal(raw, expected)  # the permutation is not a no-op, so this checks it
        torch.testing.assert_close(
            smollm2_tensors[hf_name], torch.from_numpy(expected), rtol=0, atol=0, msg=hf_name
        )


def _save_tiny(tmp_path: Path, arch: str, tied: bool, shard: bool) -> dict[str, torch.Tensor]:
    import transformers

    kwargs = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=5000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**kwargs))
    model.generation_config.eos_token_id = [2, 3]
    model.save_pretrained(tmp_path, max_shard_size="20KB" if shard else "1GB")
    return {k: v.float() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("arch", "tied", "shard"), [("llama", True, False), ("llama", False, True), ("qwen2", False, False)]
)
def test_tiny_hf_model_loads_exactly(tmp_path: Path, arch: str, tied: bool, shard: bool) -> None:
    state = _save_tiny(tmp_path, arch, tied, shard)
    assert (tmp_path / "model.safetensors.index.json").is_file() == shard
    checkpoint = load_checkpoint(tmp_path)
    c = checkpoint.config
    assert (c.architecture, c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads) == (
        arch,
        96,
        32,
        2,
        4,
        2,
    )
    assert (c.head_dim, c.rope_theta, c.rms_norm_eps, c.tie_word_embeddings) == (8, 5000.0, 1e-6, tied)
    assert c.attention_bias == (arch == "qwen2") and c.eos_token_ids == (2, 3) and c.bos_token_id == 1
    loaded = dict(checkpoint.tensors())
    assert set(loaded) == set(expected_shapes(c))
    for name, tensor in loaded.items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0, msg=name)


_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if name in top or name == "lm_head.weight":
        return top.get(name, "output.weight")
    layer, rest = name.removeprefix("model.layers.").split(".", 1)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_TO_GGUF[part]}.{kind}"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_written_like_llama_cpp_loads_as_hf(tmp_path: Path, arch: str) -> None:
    """Convert a tiny HF model the way llama.cpp's converter does (names, q/k permute for llama only)."""
    state = _save_tiny(tmp_path, arch, tied=False, shard=False)
    writer = gguf.GGUFWriter(tmp_path / "tiny.gguf", arch)
    meta = {
        "block_count": 2,
        "embedding_length": 32,
        "feed_forward_length": 64,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "context_length": 128,
    }
    for key, value in meta.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.rope.freq_base", 5000.0)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    for name, tensor in state.items():
        array = tensor.numpy()
        heads = {"q_proj": 4, "k_proj": 2}.get(name.split(".")[-2])
        if arch == "llama" and heads is not None:
            array = array.reshape(heads, 2, array.shape[0] // heads // 2, *array.shape[1:])
            array = array.swapaxes(1, 2).reshape(tensor.shape)
        writer.add_tensor(_gguf_name(name), np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    checkpoint = load_checkpoint(tmp_path / "tiny.gguf")
    c = checkpoint.config
    assert (c.architecture, c.vocab_size, c.num_kv_heads, c.head_dim) == (arch, 96, 2, 8)
    assert c.attention_bias == (arch == "qwen2") and not c.tie_word_embeddings
    loaded = dict(checkpoint.tensors())
    assert set(loaded) == set(state)
    for name, tensor in loaded.items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0, msg=name)


def _write_gguf(path: Path, arch: str, tensor: np.ndarray) -> None:
    writer = gguf.GGUFWriter(path, arch)
    for key, value in {
        "block_count": 1,
        "embedding_length": 4,
        "feed_forward_length": 8,
        "attention.head_count": 2,
    }.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_tensor("token_embd.weight", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(WeightLoadError, match="not found"):
        load_checkpoint(tmp_path / "absent.gguf")
    with pytest.raises(WeightLoadError, match=r"no config\.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(WeightLoadError, match=r"unsupported architecture.*GPT2LMHeadModel"):
        load_checkpoint(tmp_path)

    _write_gguf(tmp_path / "gpt2.gguf", "gpt2", np.zeros((3, 4), np.float32))
    with pytest.raises(WeightLoadError, match="unsupported architecture 'gpt2'"):
        load_checkpoint(tmp_path / "gpt2.gguf")
    _write_gguf(tmp_path / "int.gguf", "llama", np.zeros((3, 4), np.int32))
    with pytest.raises(WeightLoadError, match="unsupported type I32"):
        load_checkpoint(tmp_path / "int.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(WeightLoadError, match="not a readable GGUF"):
        load_checkpoint(tmp_path / "junk.gguf")


def test_missing_shard_is_reported(tmp_path: Path) -> None:
    _save_tiny(tmp_path, "llama", tied=True, shard=True)
    next(tmp_path.glob("model-00001-*.safetensors")).unlink()
    with pytest.raises(WeightLoadError, match="missing"):
        load_checkpoint(tmp_path)


def test_default_model_path_is_the_bundled_gguf() -> None:
    path = default_model_path()
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
