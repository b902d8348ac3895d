"""Hugging Face model directories: config.json + (sharded) *.safetensors -> ModelConfig + tensors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from cache.prompt.model_files import WeightLoadError
from engine.models.config import ModelConfig
from engine.weights import Checkpoint

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
INDEX_FILE = "model.safetensors.index.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise WeightLoadError(f"{path}: invalid JSON ({exc})") from exc


def _token_ids(value: Any) -> tuple[int, ...]:
    """config/generation_config store eos_token_id as an int, a list of ints or null."""
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def config_from_hf(hf: dict[str, Any], generation: dict[str, Any], where: Path) -> ModelConfig:
    architectures = hf.get("architectures") or []
    supported = [a for a in architectures if a in SUPPORTED_ARCHITECTURES]
    if not supported:
        raise WeightLoadError(
            f"{where}: unsupported architecture {architectures or hf.get('model_type')!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    arch = SUPPORTED_ARCHITECTURES[supported[0]]
    rope_scaling = hf.get("rope_scaling") or {}
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type != "default":
        raise WeightLoadError(f"{where}: RoPE scaling {rope_type!r} is not supported")
    # transformers 5 moved rope_theta into rope_parameters; older configs keep it at top level.
    rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    num_heads = int(hf["num_attention_heads"])
    bos = hf.get("bos_token_id", generation.get("bos_token_id"))
    # generation_config's list is authoritative for stopping (chat models add end-of-turn ids there).
    eos = _token_ids(generation.get("eos_token_id")) + _token_ids(hf.get("eos_token_id"))
    return ModelConfig(
        architecture=arch,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // num_heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        # qwen2 always has q/k/v biases; llama only when attention_bias is set.
        attention_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(dict.fromkeys(eos)),
    )


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files: the shards named by the index when sharded, else every *.safetensors."""
    index = directory / INDEX_FILE
    if index.is_file():
        names = sorted(set(_read_json(index)["weight_map"].values()))
        files = [directory / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightLoadError(f"{directory}: shards listed in {INDEX_FILE} are missing: {missing}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(
            f"{directory}: no *.safetensors files (only safetensors checkpoints are supported)"
        )
    return files


def _skip(name: str, config: ModelConfig) -> bool:
    # Old checkpoints store the RoPE inverse frequencies; tied models may still carry an lm_head copy.
    return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")


def iter_safetensors(files: list[Path], config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                if not _skip(name, config):
                    yield name, handle.get_tensor(name).to(torch.float32)


def open_hf_dir(directory: Path) -> Checkpoint:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise WeightLoadError(f"{directory}: no config.json (expected a Hugging Face model directory)")
    generation_path = directory / "generation_config.json"
    generation = _read_json(generation_path) if generation_path.is_file() else {}
    config = config_from_hf(_read_json(config_path), generation, config_path)
    files = safetensors_files(directory)
    return Checkpoint(
        config=config,
        tokenizer_source=directory,
        path=directory,
        read_tensors=partial(iter_safetensors, files, config),
    )
