"""Pure decode steps on CPU with every layer in one C++ call (``fused_decode.cpp``).

At batch 1 the default 135M model's decode step is about 1,500 tensor ops of a few hundred numbers
each, whose kernels take less time than Python spends between them: interpreter, argument parsing and
dispatch, a few microseconds an op. The C++ loop calls the projections as ``LayerPlan.forward`` does
(the same ATen kernels) and does the rest itself: each RMSNorm with the residual add before it, the
rotary embedding and the KV writes are one loop each instead of 5-7 ATen ops, and attention reads
the paged KV pool directly (fp32 softmax; a long batch-1 context split across threads; a prefix
every row shares through one flash-attention call for all of them, as attention._cascade). The
arithmetic is the Python path's, fp32 statistics and the same roundings to the activation dtype,
summed in other orders: fp32 logits agree to ~1e-6 relative and bf16 ones to a rounding or two
(tests/engine/test_fused_decode.py). Measured on 2 cores, the batch-1 int4 step is 1.42x faster
(docs/benchmarks.md).

The extension is compiled when a model loads, through PyTorch's own ``torch.utils.cpp_extension``
(the system's C++ compiler and ninja, ~45 s the first time), and cached on disk for later processes
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). Where it cannot build,
``load_extension`` logs why once and the model keeps the Python path, as it does for a model the
C++ side does not take (see ``build``). Steps with prefill chunks take the Python path; CUDA decode
steps replay CUDA graphs instead (decode_graphs.py).
"""

from __future__ import annotations

import logging
import platform
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.models.cpu_linear import PackedLinear
from engine.models.quant_linear import Int4Linear, Int8Linear

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".cpp")
_NONE = torch.empty(0)  # an absent tensor, as the C++ side reads it


def build_flags() -> tuple[str, list[str]]:
    """The extension's name and compiler flags for this CPU: AVX2 code (8 floats an instruction in
    the attention's loops) where PyTorch itself runs AVX2 or AVX-512 kernels, portable code elsewhere.
    The name carries the choice, so a cache shared by unlike machines keeps one build for each."""
    flags = ["-O3", "-fopenmp"]  # OpenMP: at::parallel_for, with the runtime torch already loaded
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine() in ("x86_64", "AMD64") and capability in ("AVX2", "AVX512"):
        return "prefixgate_fused_decode_avx2", [*flags, "-mavx2", "-mfma", "-mf16c"]
    return "prefixgate_fused_decode", flags


@cache
def load_extension() -> Any | None:
    """The compiled extension module, or None (logged once) where this machine cannot build it."""
    try:
        from torch.utils import cpp_extension

        name, flags = build_flags()
        return cpp_extension.load(name, [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"])
    except Exception as exc:  # no compiler, no ninja, no headers: the Python path still works
        log.warning("fused CPU decode unavailable, decoding layer by layer in Python: %s", exc)
        return None


def matmul_spec(module: nn.Module) -> tuple[int, list[torch.Tensor], list[int]]:
    """``(kind, [weight, scales, bias, dense], [group_size, max_rows])`` as fused_decode.cpp's Matmul
    takes one projection; empty tensors stand for absent ones."""
    bias = getattr(module, "bias", None)
    bias = _NONE if bias is None else bias
    if isinstance(module, Int4Linear):
        tensors = [module.packed, module.scales_and_zeros, bias, module.dense]
        return 1, tensors, [module.group_size, module.max_rows]
    if isinstance(module, Int8Linear):
        return 2, [module.weight, module.scales, bias, module.dense], [0, module.max_rows]
    if isinstance(module, PackedLinear):
        return 3, [module.packed, _NONE, bias, _NONE], [0, 0]
    if isinstance(module, nn.Linear):
        return 0, [module.weight, _NONE, bias, _NONE], [0, 0]
    raise TypeError(f"no fused matmul for {type(module).__name__}")


def build(model: nn.Module) -> Any | None:
    """The C++ decoder over ``model``'s current weights (a ``LlamaForCausalLM``), or None (logged)
    without the extension or for a model it does not take. It holds references, not copies;
    quantized projections' ``max_rows`` are read now."""
    ext = load_extension()
    if ext is None:
        return None
    cfg = model.config
    norms, kinds, tensors, ints = [], [], [], []
    try:
        for layer in model.layers:
            norms += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            attn, mlp = layer.self_attn, layer.mlp
            for module in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                kind, weights, numbers = matmul_spec(module)
                kinds.append(kind)
                tensors += weights
                ints += numbers
        return ext.FusedDecoder(
            norms,
            kinds,
            tensors,
            ints,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.intermediate_size,
            cfg.rms_norm_eps,
        )
    except (TypeError, RuntimeError) as exc:  # an unknown projection, a head shape it cannot take
        log.warning("fused CPU decode does not take this model, decoding layer by layer: %s", exc)
        return None
