"""Attention over a paged KV cache, in plain torch (SDPA), for mixed prefill-chunk + decode batches.

Layout: the KV pool is ``[layers, num_slots, kv_heads, head_dim]`` for K and for V, where
``slot = page * page_size + offset``. A sequence's KV lives in the slots of its pages, in order;
the runner turns page tables into slot indices once per step (``AttentionBatch``), so each layer
only does an ``index_copy_`` (write) and a gather (read).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class KVCache:
    k: torch.Tensor  # [L, num_slots, KVH, D]
    v: torch.Tensor  # [L, num_slots, KVH, D]
    # (k[l], v[l]) per layer, taken once: a step would otherwise index the pool twice per layer.
    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))


@dataclass
class PrefillSegment:
    """One sequence's chunk of new tokens (a prefill chunk, or any multi-token step)."""

    start: int  # first row of this sequence in the packed token stream
    length: int  # Q: new tokens
    kv_slots: torch.Tensor  # [K] slots of all its tokens so far, cached prefix + the new ones
    mask: torch.Tensor | None  # [Q, K] bool, None when K == Q (plain causal)


@dataclass
class DecodeGroup:
    """Single-token steps of many sequences, batched into one SDPA call.

    With ``prefix_slots`` (cascade attention), every sequence of the group shares those leading keys
    (the same cached pages) and ``kv_slots`` holds only each one's own keys after them."""

    rows: torch.Tensor  # [B] rows of the packed token stream
    kv_slots: torch.Tensor  # [B, Kmax] slots, padded with slot 0
    # [B, 1, 1, Kmax] bool (True = attend), None when no padding; with prefix_slots an additive bias
    # in the activation dtype instead (0 or -inf: what the CPU flash kernel behind the cascade takes)
    mask: torch.Tensor | None
    all_rows: bool = False  # rows == 0..B-1 == every row of the step: q needs no gather, out no scatter
    prefix_slots: torch.Tensor | None = None  # [P] slots of the keys every row shares, else None


@dataclass
class AttentionBatch:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    prefills: list[PrefillSegment]
    decode: DecodeGroup | None


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,  # [T, KVH, D]
    kv: KVCache,
    layer: int,
    batch: AttentionBatch,
) -> torch.Tensor:
    k_cache, v_cache = kv.layers[layer]
    k_cache.index_copy_(0, batch.slot_mapping, k)
    v_cache.index_copy_(0, batch.slot_mapping, v)
    T, H, D = q.shape
    KVH = k.shape[1]
    group = batch.decode
    if group is not None and group.all_rows:  # a pure decode step: the common case, kept short
        return _decode(q.view(T, KVH, H // KVH, D), k_cache, v_cache, group).reshape(T, H, D)
    out = torch.empty_like(q)

    for seg in batch.prefills:
        rows = slice(seg.start, seg.start + seg.length)
        if seg.mask is None:  # no cached prefix: attend to the fresh K/V directly, no gather
            keys, values = k[rows], v[rows]
        else:
            keys, values = k_cache.index_select(0, seg.kv_slots), v_cache.index_select(0, seg.kv_slots)
        # 4-D inputs: CPU SDPA takes its fused (flash) kernel only with a batch dimension.
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0),  # [1, H, Q, D]
            keys.transpose(0, 1).unsqueeze(0),  # [1, KVH, K, D]
            values.transpose(0, 1).unsqueeze(0),
            attn_mask=seg.mask,
            is_causal=seg.mask is None,
            enable_gqa=True,
        )[0]
        out[rows] = o.transpose(0, 1)

    if group is not None:
        B = group.rows.shape[0]
        qd = q[group.rows].view(B, KVH, H // KVH, D)  # [B, KVH, G, D]
        out[group.rows] = _decode(qd, k_cache, v_cache, group).reshape(B, H, D)
    return out


def _decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup
) -> torch.Tensor:
    # q: [B, KVH, G, D] -> [B, KVH, G, D]. GQA without repeating K/V: the G query heads of one KV
    # head become G "query positions". All of them sit at the same position, so one key mask
    # serves them all.
    # index_select, not k_cache[slots]: a plain row gather, several times faster than advanced indexing.
    B, K = group.kv_slots.shape
    slots = group.kv_slots.view(-1)
    keys = k_cache.index_select(0, slots).view(B, K, *k_cache.shape[1:]).transpose(1, 2)  # [B, KVH, K, D]
    values = v_cache.index_select(0, slots).view(B, K, *v_cache.shape[1:]).transpose(1, 2)
    if group.prefix_slots is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=group.mask)
    return _cascade(q, k_cache, v_cache, group.prefix_slots, keys, values, group.mask)


def _cascade(
    q: torch.Tensor,  # [B, KVH, G, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_slots: torch.Tensor,  # [P]: keys every row attends to
    keys: torch.Tensor,  # [B, KVH, K, D]: each row's own keys after the prefix
    values: torch.Tensor,
    bias: torch.Tensor | None,  # [B, 1, 1, K] additive, in q's dtype
) -> torch.Tensor:
    """Cascade attention (FlashInfer's): the shared prefix once for every row, its keys gathered once
    and all rows' queries stacked into one bigger tile (where CPU flash attention is efficient), each
    row's own keys apart, the two merged through their log-sum-exps. With 8 rows on a 2,000-token
    prefix: 0.73 ms a layer against 1.9 ms for the rows attending to their full keys."""
    B, KVH, G, D = q.shape
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    prefix_k = k_cache.index_select(0, prefix_slots).transpose(0, 1).unsqueeze(0)  # [1, KVH, P, D]
    prefix_v = v_cache.index_select(0, prefix_slots).transpose(0, 1).unsqueeze(0)
    out_p, lse_p = flash(q.transpose(0, 1).reshape(1, KVH, B * G, D), prefix_k, prefix_v)[:2]
    out_p = out_p.view(KVH, B, G, D).transpose(0, 1)  # [B, KVH, G, D]
    lse_p = lse_p.view(KVH, B, G).transpose(0, 1)  # [B, KVH, G] fp32
    out_s, lse_s = flash(q, keys, values, attn_mask=bias)[:2]
    top = torch.maximum(lse_p, lse_s)
    w_p, w_s = (lse_p - top).exp_().unsqueeze(-1), (lse_s - top).exp_().unsqueeze(-1)
    return torch.addcmul(out_p.float() * w_p, out_s.float(), w_s).div_(w_p + w_s).to(q.dtype)
