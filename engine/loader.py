"""Model loading, apart from the engine: a checkpoint -> a model on its device, with its tokenizer.

``LLMEngine`` takes a ``LoadedModel`` and builds only what serving needs around it (KV pool, prefix
cache, scheduler), so several engines (tests, benchmarks) can share one loaded model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from cache.prompt.model_files import model_path
from cache.prompt.tokenizer import Tokenizer
from engine.config import EngineConfig
from engine.models import fused_decode
from engine.models.cpu_linear import packing_available
from engine.models.llama import LlamaForCausalLM
from engine.models.quant_linear import QuantizedLinear, measure_max_rows, resolve_weights
from engine.weights import load_checkpoint

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them CPU bf16 matmuls convert through fp32 and run slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run and the facts about it that serving needs. Immutable; shareable."""

    model: LlamaForCausalLM
    tokenizer: Tokenizer
    model_id: str  # the name served over the API
    path: Path
    device: torch.device
    dtype: torch.dtype  # activations, KV cache and float weights
    weights: str = "float"  # matmul weights: "float" (in dtype), "int8" or "int4"

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """EOS ids from the model's config and its tokenizer, merged."""
        return tuple(sorted(set(self.model.config.eos_token_ids) | set(self.tokenizer.eos_token_ids)))


def served_model_id(config: EngineConfig) -> str:
    """The name the engine serves: ``--model-id``, else the checkpoint's file or directory name."""
    return config.model_id or model_path(config.model).name.removesuffix(".gguf")


def _set_quantized_max_rows(model: LlamaForCausalLM, configured: int | None) -> None:
    """Where the quantized kernels stop paying: as configured, else measured here, separately for the
    layers' projections and the LM head (a 49k-row int8 matrix crosses over at its own row count)."""
    head = model.packed_head
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m is not head]
    groups = {"layers": layers, "LM head": [head] if isinstance(head, QuantizedLinear) else []}
    for name, modules in groups.items():
        if not modules:
            continue
        if configured is not None:
            for m in modules:
                m.max_rows = configured
            continue
        rows = measure_max_rows(modules)
        log.info(
            "quantized kernels serve steps of up to %d rows (%s; measured, --quantized-max-rows)", rows, name
        )


def load_model(config: EngineConfig) -> LoadedModel:
    """Read the checkpoint, build the model on ``config.device`` in ``config.dtype`` (``auto`` resolved)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    path = model_path(config.model)
    checkpoint = load_checkpoint(path)
    tokenizer = Tokenizer.from_source(checkpoint.tokenizer_source)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    with torch.device("meta"):
        model = LlamaForCausalLM(checkpoint.config)
    model = model.to_empty(device="cpu").float()
    model.rotary.build()
    model.load_weights(checkpoint.tensors())
    weights = resolve_weights(config.weights, device, dtype)
    if weights != "float":  # from the fp32 weights (and the file's own 4-bit groups), before the cast
        model.quantize(weights, checkpoint.group_quantized())
    model = model.to(device=device, dtype=dtype).eval()
    model.rotary.build()  # keep the rotary tables in fp32 on the device
    if weights == "float" and config.cpu_packed_linears and packing_available(device, dtype):
        model.pack_for_cpu()
    if weights != "float":
        _set_quantized_max_rows(model, config.quantized_max_rows)
    # Built (or loaded from its cache) now, not on the first request: a first build takes ~45 s.
    model.fused_decode = (
        config.fused_decode and device.type == "cpu" and fused_decode.load_extension() is not None
    )
    log.info(
        "loaded %s on %s as %s, %s weights", path.name, device, str(dtype).removeprefix("torch."), weights
    )
    return LoadedModel(model, tokenizer, served_model_id(config), path, device, dtype, weights)
