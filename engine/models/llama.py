"""Llama-family decoder (Llama, SmolLM, Qwen2) in plain torch, reading and writing a paged KV cache.

The model sees one flat stream of tokens per step — every sequence's new tokens packed end to end —
so the linear layers (most of the FLOPs) run once on ``[T, D]`` whatever the mix of prefill chunks
and decodes. Only attention needs to know where each sequence starts; that is ``AttentionBatch``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.models import fused_decode
from engine.models.attention import AttentionBatch, KVCache, paged_attention
from engine.models.config import ModelConfig
from engine.models.cpu_linear import PackedLinear, pack_linears
from engine.models.quant_linear import Int4Linear, Int8Linear
from engine.weights.quant import GroupQuant4

# Hugging Face projections that share one matmul here: hf suffix -> (our module, shard index).
FUSED_PROJECTIONS = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, signed sin: [T, 1, head_dim] fp32, see Rotary.tables


class RMSNorm(nn.Module):
    """The norm's weight (and eps); ``rms_norm`` computes it."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 as the reference implementation does (bf16 variance loses digits), in six
    # tensor ops instead of the textbook eight: the norm reads x in fp32 without a cast pass, and
    # mean(x^2) + eps = norm^2 / D + eps is one addcmul on a [T, 1] tensor.
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    scale = torch.addcmul(norm.new_full((), eps), norm, norm, value=1 / x.shape[-1]).rsqrt_()
    return weight * (x * scale).to(x.dtype)


class Rotary(nn.Module):
    """Non-interleaved RoPE (``rotate_half``), Hugging Face's layout.

    The tables are full width so a rotation is two multiplies and a roll (``apply_rotary``) rather than
    the reference's split halves, four multiplies and a concatenation: per layer and step, five tensor
    ops instead of nine, which at batch-1 decode is where the time goes (each op is microseconds of
    dispatch for a few hundred numbers)."""

    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        super().__init__()
        self.head_dim, self.theta, self.max_positions = head_dim, theta, max_positions
        self.register_buffer("cos", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim), persistent=False)
        if self.cos.device.type != "meta":
            self.build()

    def build(self) -> None:
        """(Re)compute the fp32 tables on the buffers' device, e.g. after ``to_empty`` or a dtype cast."""
        device = self.cos.device
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        angles = torch.outer(torch.arange(self.max_positions, dtype=torch.float64), inv_freq)  # [P, D/2]
        cos, sin = angles.cos(), angles.sin()
        self.cos = torch.cat((cos, cos), dim=-1).float().to(device)  # [P, D]
        self.sin = torch.cat((-sin, sin), dim=-1).float().to(device)  # [P, D]: rotate_half's signs folded in

    def tables(self, positions: torch.Tensor) -> Rope:
        """cos and signed sin of every token's angles, ``[T, 1, D]`` fp32 each: looked up once per step."""
        return self.cos.index_select(0, positions).unsqueeze(1), self.sin.index_select(
            0, positions
        ).unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D]; cos, sin: [T, 1, D] (Rotary.tables). rotate_half(x) = (-x2, x1): the roll
    # swaps the halves, the signed sin table negates the first.
    xf = x.float()
    return torch.addcmul(xf * cos, xf.roll(x.shape[-1] // 2, dims=-1), sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        # q, k and v share one matmul: one kernel launch instead of three per layer.
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=False)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)


class DecoderLayer(nn.Module):
    """One layer's weights, named as Hugging Face's; ``LayerPlan.forward`` computes the layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


Matmul = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LayerPlan:
    """One decoder layer as plain references: its norms' weights and its matmuls' bound ``forward``.

    A step runs every layer through these, so its inner loop does no ``nn.Module`` attribute lookups
    and no ``__call__`` hook checks: together about 1.5 ms of a 9 ms batch-1 decode step of the
    default 30-layer model on CPU, where each layer's own kernels take tens of microseconds.
    The model drops its plans whenever they could go stale: ``.to()`` and kin (``_apply``, which may
    replace Parameter objects) and swapping a module for another (``quantize``, ``pack_for_cpu``)."""

    index: int
    input_norm: torch.Tensor
    qkv: Matmul
    o: Matmul
    post_norm: torch.Tensor
    gate_up: Matmul
    down: Matmul
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    eps: float

    @classmethod
    def of(cls, layer: DecoderLayer, index: int, cfg: ModelConfig) -> LayerPlan:
        attn, mlp = layer.self_attn, layer.mlp
        return cls(
            index,
            layer.input_layernorm.weight,
            attn.qkv_proj.forward,
            attn.o_proj.forward,
            layer.post_attention_layernorm.weight,
            mlp.gate_up_proj.forward,
            mlp.down_proj.forward,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.intermediate_size,
            cfg.rms_norm_eps,
        )

    def forward(self, x: torch.Tensor, rope: Rope, batch: AttentionBatch, kv: KVCache) -> torch.Tensor:
        T = x.shape[0]
        H, KVH, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(rms_norm(x, self.input_norm, self.eps))  # [T, (H + 2 KVH) D]
        # q and k heads rotate together: one set of element-wise ops instead of two.
        qk = apply_rotary(qkv[:, : (H + KVH) * D].view(T, H + KVH, D), *rope)
        v = qkv[:, (H + KVH) * D :].view(T, KVH, D)
        out = paged_attention(qk[:, :H], qk[:, H:], v, kv, self.index, batch)  # [T, H, D]
        x = x + self.o(out.reshape(T, H * D))
        gate, up = self.gate_up(rms_norm(x, self.post_norm, self.eps)).split(self.intermediate_size, dim=-1)
        return x + self.down(F.silu(gate) * up)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)
        self.lm_head = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        self.packed_head: nn.Module | None = None  # see pack_for_cpu and quantize
        # Pure decode steps run every layer in one C++ call (fused_decode.py; CPU: set by the loader).
        self.fused_decode = False
        self._plans: list[LayerPlan] | None = None  # built on first use; None again when modules change
        self._fused = None  # fused_decode.build's decoder, likewise

    def replan(self) -> None:
        """Drop the plans and the fused decoder, which hold references to the current weights and
        settings (quantized ``max_rows``): the next step rebuilds them."""
        self._plans = self._fused = None

    def _apply(self, fn, recurse=True):  # .to(), .to_empty(), ...: may replace parameters, so re-plan
        self.replan()
        return super()._apply(fn, recurse)

    def plans(self) -> list[LayerPlan]:
        if self._plans is None:
            self._plans = [LayerPlan.of(layer, i, self.config) for i, layer in enumerate(self.layers)]
        return self._plans

    def fused_decoder(self):
        """The C++ decoder of pure decode steps, or None where it cannot serve this model (then the
        model stops asking: ``fused_decode`` turns off)."""
        if self._fused is None:
            self._fused = fused_decode.build(self)
            self.fused_decode = self._fused is not None
        return self._fused

    def pack_for_cpu(self) -> None:
        """Pre-pack every matmul weight for oneDNN (fp32 CPU inference only; weights are then frozen)."""
        pack_linears(self)
        self.replan()
        if self.lm_head is None:  # tied: the head gets its own packed copy of the embedding
            self.packed_head = PackedLinear(self.embed_tokens.weight, None)

    def shard_rows(self, module: str) -> list[int]:
        """Output rows of each Hugging Face projection fused into ``module`` (qkv_proj, gate_up_proj)."""
        cfg = self.config
        q, kvs = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return {"self_attn.qkv_proj": [q, kvs, kvs], "mlp.gate_up_proj": [cfg.intermediate_size] * 2}[module]

    @torch.no_grad()
    def quantize(self, mode: str, file_groups: Iterable[tuple[str, GroupQuant4]] = ()) -> None:
        """Swap the matmul weights for weight-only ``int4`` or ``int8`` ones (CPU; frozen afterwards).

        Call on the loaded fp32 model, before ``.to(dtype)`` (which then casts the scales). ``int4``:
        every projection takes the file's own 4-bit groups where it has them (``file_groups``, HF
        names: GGUF Q4_0/Q4_1, served exactly), else groups quantized here from the float weight.
        The LM head is int8 per row in both modes: its file copy is usually 8- or 6-bit, and every
        sampled token is read from its output.
        """
        assert mode in ("int4", "int8"), mode
        groups = {name.removeprefix("model."): q for name, q in file_groups}
        for i, layer in enumerate(self.layers):
            for parent, attr in (
                (layer.self_attn, "qkv_proj"),
                (layer.self_attn, "o_proj"),
                (layer.mlp, "gate_up_proj"),
                (layer.mlp, "down_proj"),
            ):
                linear: nn.Linear = getattr(parent, attr)
                if mode == "int8":
                    setattr(parent, attr, Int8Linear(linear.weight, linear.bias))
                    continue
                module = f"{'self_attn' if parent is layer.self_attn else 'mlp'}.{attr}"
                hf_parts = [hf for hf, (ours, _) in FUSED_PROJECTIONS.items() if ours == module] or [module]
                rows = self.shard_rows(module) if len(hf_parts) > 1 else [linear.out_features]
                parts, start = [], 0
                for hf, n in zip(hf_parts, rows, strict=True):
                    own = groups.get(f"layers.{i}.{hf}.weight")
                    parts.append(
                        own if own is not None else GroupQuant4.from_float(linear.weight[start : start + n])
                    )
                    start += n
                setattr(parent, attr, Int4Linear(GroupQuant4.cat(parts), linear.bias))
        head = self.lm_head.weight if self.lm_head is not None else self.embed_tokens.weight
        self.packed_head = Int8Linear(head, None)
        self.replan()

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] new tokens of every sequence, packed
        positions: torch.Tensor,  # [T]
        batch: AttentionBatch,
        kv: KVCache,
        logits_indices: torch.Tensor | None = None,  # [N] rows of T whose next-token logits are wanted
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary.tables(positions)
        decode = batch.decode
        fused = self.fused_decoder() if self.fused_decode and decode is not None and decode.all_rows else None
        if fused is not None:
            x = fused.forward(
                x, *rope, kv.k, kv.v, batch.slot_mapping, decode.kv_slots, decode.mask, decode.prefix_slots
            )
        else:
            for plan in self.plans():
                x = plan.forward(x, rope, batch, kv)
        if logits_indices is not None:
            x = x[logits_indices]  # the LM head over 49k vocab is costly: only where we sample
        x = rms_norm(x, self.norm.weight, self.norm.eps)
        if self.packed_head is not None:
            return self.packed_head(x).float()  # [N, V]
        if self.lm_head is not None:
            return self.lm_head(x).float()  # [N, V]
        return F.linear(x, self.embed_tokens.weight).float()

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up as they arrive."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in tensors:
            name = name.removeprefix("model.")
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: some checkpoints store the copy anyway
            for hf, (ours, shard) in FUSED_PROJECTIONS.items():
                if f".{hf}." in name:
                    name = name.replace(hf, ours)
                    param = params[name]
                    rows = self.shard_rows(ours)
                    start = sum(rows[:shard])
                    param.data[start : start + rows[shard]].copy_(tensor)
                    break
            else:
                param = params.get(name)
                if param is None:
                    raise KeyError(f"checkpoint tensor {name!r} has no place in the model")
                if param.shape != tensor.shape:
                    raise ValueError(
                        f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(param.shape)}"
                    )
                param.data.copy_(tensor)
            loaded.add(name)
        missing = {n for n in params if n not in loaded}
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
