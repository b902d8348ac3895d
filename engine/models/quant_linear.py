"""Weight-only quantized linear layers for CPU decode: int4 (groups of 32) and int8 (per row).

A decode step at batch 1 reads every weight once and does little arithmetic with it, so its time is
the bytes read. bf16 weights are 2 bytes each; the file's Q4 blocks are ~0.6 (4 bits + a scale and
zero per 32 weights). These modules keep the weights small and let PyTorch's weight-only kernels
dequantize in registers:

- ``Int4Linear``: ``aten._weight_int4pack_mm_for_cpu``, scales and zeros per group of 32 along K,
  in the activation dtype (the kernel requires it: the module follows ``model.to(dtype)``).
- ``Int8Linear``: ``aten._weight_int8pack_mm``, one symmetric scale per output row.

These kernels are matrix-vector loops: their time grows linearly with the rows of ``x``, while a
dense bf16 matmul of up to a few hundred rows costs about the same as one row. Measured on this
project's 2-core AVX512-BF16 server (one thread), a ``[3072, 576]`` projection: int4 3x faster than
dense bf16 at 1 row, even at 4, 2x slower at 16; with fp32 activations they are 10-100x slower than
dense (reference loops). So each module also keeps the dense weight and takes it for batches of more
than ``max_rows`` rows (prefill chunks, larger decode batches): quantization speeds up small decode
batches without slowing prefill, at the price of memory (dense + quantized copy).

Weights are frozen once packed. CPU only: CUDA's int4 kernel wants another packing (tinygemm).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.weights.quant import GroupQuant4

WEIGHT_MODES = ("auto", "float", "int8", "int4")
QUANTIZED_MAX_ROWS = 4  # above this many rows the dense weight is faster, unless measured (see above)
CALIBRATION_ROWS = (1, 2, 4, 8, 16, 32, 64)  # the row counts measure_max_rows tries, ascending


def quantized_kernels_available(device: torch.device) -> bool:
    return (
        device.type == "cpu"
        and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        and hasattr(torch.ops.aten, "_weight_int8pack_mm")
    )


def resolve_weights(mode: str, device: torch.device, dtype: torch.dtype) -> str:
    """``auto`` -> ``int4`` where it is fastest: CPU kernels present and bf16 activations (with fp32
    ones the kernels are slower than dense); else ``float``. An explicit quantized mode without the
    kernels is an error, not a silent fallback."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}, not {mode!r}")
    if mode == "auto":
        return "int4" if quantized_kernels_available(device) and dtype == torch.bfloat16 else "float"
    if mode != "float" and not quantized_kernels_available(device):
        raise ValueError(f"weights={mode} needs PyTorch's CPU weight-only kernels (device {device})")
    return mode


class QuantizedLinear(nn.Module):
    """A quantized linear that keeps its dense weight for batches of more than ``max_rows`` rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, max_rows: int) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.max_rows = max_rows
        # Floating buffers follow model.to(dtype); integer ones (the quantized weights) are left alone.
        self.register_buffer("dense", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def quantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> [T, out]
        if x.shape[0] > self.max_rows:
            return F.linear(x, self.dense, self.bias)
        out = self.quantized_matmul(x)
        return out if self.bias is None else out + self.bias


class Int4Linear(QuantizedLinear):
    def __init__(
        self, quant: GroupQuant4, bias: torch.Tensor | None, max_rows: int = QUANTIZED_MAX_ROWS
    ) -> None:
        # The dense copy is the groups dequantized, so both paths compute with the same weights.
        super().__init__(quant.dequantize(), bias, max_rows)
        self.group_size = quant.group_size
        # [N, K/2] uint8 in the CPU kernel's layout.
        self.register_buffer(
            "packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(quant.q.to(torch.int32), 1)
        )
        # [K/G, N, 2] (scale, zero), in the activation dtype as the kernel requires.
        self.register_buffer(
            "scales_and_zeros", torch.stack([quant.scale, quant.zero], dim=-1).transpose(0, 1).contiguous()
        )

    def quantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, self.group_size, self.scales_and_zeros
        )


class Int8Linear(QuantizedLinear):
    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, max_rows: int = QUANTIZED_MAX_ROWS
    ) -> None:
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)  # [N], symmetric per output row
        q = (w / scales[:, None]).round_().clamp_(-127, 127).to(torch.int8)  # [N, K]
        super().__init__(q.float() * scales[:, None], bias, max_rows)  # both paths: the same weights
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)

    def quantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)


def crossover_rows(
    seconds: Callable[[int, bool], float], candidates: Sequence[int] = CALIBRATION_ROWS
) -> int:
    """The largest of ``candidates`` (ascending) up to which the quantized path is faster, by
    ``seconds(rows, quantized)``; 0 when the dense path wins even at the first. It stops at the first
    count where dense wins: quantized kernels cost in proportion to the rows, dense ones barely."""
    best = 0
    for rows in candidates:
        if seconds(rows, True) >= seconds(rows, False):
            break
        best = rows
    return best


@torch.inference_mode()
def measure_max_rows(modules: Sequence[QuantizedLinear], repeats: int = 3) -> int:
    """Time one pass over ``modules`` (a whole model's projections, so the weights come from memory as
    in a real step, not from cache) quantized and dense at each candidate row count, best of
    ``repeats``, and set every module's ``max_rows`` to the crossover. Returns it. About half a second
    for a 135M model on 2 cores."""
    first = modules[0].dense
    inputs: dict[tuple[int, int], torch.Tensor] = {}

    def seconds(rows: int, quantized: bool) -> float:
        for m in modules:
            inputs.setdefault((rows, m.in_features), torch.randn(rows, m.in_features, dtype=first.dtype))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for m in modules:
                x = inputs[rows, m.in_features]
                m.quantized_matmul(x) if quantized else F.linear(x, m.dense, m.bias)
            best = min(best, time.perf_counter() - start)
        return best

    rows = crossover_rows(seconds)
    for m in modules:
        m.max_rows = rows
    return rows
