"""Group-wise 4-bit weights: one format for GGUF's Q4_0/Q4_1 blocks and for weights we quantize.

A ``GroupQuant4`` stores, for a weight ``[N, K]`` cut into groups of ``group_size`` along K,

    w[n, k] = (q[n, k] - 8) * scale[n, k // G] + zero[n, k // G],    q in 0..15

which is the convention of PyTorch's int4 weight-only matmul kernels. llama.cpp's 4-bit blocks (32
weights, fp16 scale ``d``, and for Q4_1 an fp16 minimum ``m``) map onto it exactly:

    Q4_1: w = d * q + m     -> scale = d, zero = m + 8 d
    Q4_0: w = d * (q - 8)   -> scale = d, zero = 0

so serving a Q4 file's own blocks adds no quantization error beyond the file's (``zero`` is rounded
once to fp32, or to the activation dtype when the kernel runs in bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

GGUF_GROUP_SIZE = 32  # QK4_0 == QK4_1 == 32
GGUF_Q4_TYPES = frozenset({QType.Q4_0, QType.Q4_1})


@dataclass(frozen=True)
class GroupQuant4:
    q: torch.Tensor  # [N, K] uint8, values 0..15
    scale: torch.Tensor  # [N, K // group_size] float32
    zero: torch.Tensor  # [N, K // group_size] float32
    group_size: int

    def __post_init__(self) -> None:
        N, K = self.q.shape
        assert K % self.group_size == 0, f"K={K} is not a multiple of the group size {self.group_size}"
        assert self.scale.shape == self.zero.shape == (N, K // self.group_size)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``[N, K]`` these groups stand for."""
        N, K = self.q.shape
        q = self.q.view(N, K // self.group_size, self.group_size).float() - 8.0
        return (q * self.scale[..., None] + self.zero[..., None]).view(N, K)

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int = GGUF_GROUP_SIZE) -> GroupQuant4:
        """Asymmetric min/max quantization per group (what llama.cpp's reference Q4_1 quantizer does)."""
        N, K = weight.shape
        w = weight.detach().float().view(N, K // group_size, group_size)
        lo, hi = w.amin(-1), w.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-12)
        q = ((w - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.uint8)
        return cls(q.view(N, K), scale, lo + 8 * scale, group_size)

    @classmethod
    def from_gguf_blocks(cls, raw: np.ndarray, qtype: QType, shape: tuple[int, int]) -> GroupQuant4:
        """Decode a Q4_0/Q4_1 tensor's raw blocks (``shape`` is torch's ``[N, K]``), without dequantizing."""
        assert qtype in GGUF_Q4_TYPES, qtype
        N, K = shape
        G = GGUF_GROUP_SIZE
        header = 4 if qtype == QType.Q4_1 else 2  # fp16 d (and fp16 m)
        blocks = np.asarray(raw, dtype=np.uint8).reshape(N, K // G, header + G // 2)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, K/G]
        if qtype == QType.Q4_1:
            m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
            zero = m + 8 * d
        else:
            zero = np.zeros_like(d)
        packed = blocks[..., header:]  # [N, K/G, 16]: byte j holds element j (low) and j + 16 (high)
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)  # [N, K/G, 32]
        return cls(torch.from_numpy(q.reshape(N, K)), torch.from_numpy(d), torch.from_numpy(zero), G)

    def rows(self, index: torch.Tensor | np.ndarray) -> GroupQuant4:
        """The same groups with output rows reordered (e.g. undoing llama.cpp's q/k permutation)."""
        index = torch.as_tensor(index)
        return GroupQuant4(self.q[index], self.scale[index], self.zero[index], self.group_size)

    @staticmethod
    def cat(parts: list[GroupQuant4]) -> GroupQuant4:
        """Stack along output rows (fused q/k/v and gate/up projections)."""
        assert len({p.group_size for p in parts}) == 1
        return GroupQuant4(
            torch.cat([p.q for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.zero for p in parts]),
            parts[0].group_size,
        )
