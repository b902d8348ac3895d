"""CUDA graphs for pure decode steps: one kernel-launch replay instead of ~1,000 launches per step.

Imported by the runner only when its device is CUDA. A graph is captured lazily per bucket
``(B, K)``: batch size rounded up to 1, 2, 4, 8, ... and context length (keys per sequence) rounded up
to a power of two from 256, so a handful of graphs serve every decode step. Steps with a prefill
chunk, or beyond the largest bucket, run eagerly.

Padding rows copy row 0 (same token, position, KV slot and keys): they write the same K/V to the
same slot, so a padded replay changes nothing but row 0's slot, with the value row 0 writes anyway.
Their logits are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.models.attention import AttentionBatch, DecodeGroup, KVCache
from engine.models.llama import LlamaForCausalLM

MAX_GRAPH_BATCH = 64
MIN_GRAPH_KEYS = 256


def bucket(n: int, floor: int) -> int:
    return max(floor, 1 << (n - 1).bit_length())


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    slot_mapping: torch.Tensor  # [B]
    kv_slots: torch.Tensor  # [B, K]
    mask: torch.Tensor  # [B, 1, 1, K] bool
    logits: torch.Tensor  # [B, V] fp32, written by every replay


class DecodeGraphs:
    """Captured decode steps of one model and KV cache. Not thread-safe: the engine thread owns it."""

    def __init__(self, model: LlamaForCausalLM, kv: KVCache, max_keys: int) -> None:
        self.model, self.kv, self.max_keys = model, kv, max_keys
        self.device = model.embed_tokens.weight.device
        assert self.device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool shared by every graph
        self.graphs: dict[tuple[int, int], _Graph] = {}

    def fits(self, batch: AttentionBatch) -> bool:
        group = batch.decode
        return (
            group is not None
            and group.all_rows
            and group.rows.shape[0] <= MAX_GRAPH_BATCH
            and group.kv_slots.shape[1] <= self.max_keys
        )

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """Logits ``[B, V]`` of a pure decode step (``fits(batch)``), by replaying its bucket's graph."""
        group = batch.decode
        assert group is not None
        B, K = group.kv_slots.shape
        g = self._graph(bucket(B, 1), min(bucket(K, MIN_GRAPH_KEYS), self.max_keys))
        pad = g.input_ids.shape[0] - B
        g.input_ids[:B].copy_(input_ids)
        g.positions[:B].copy_(positions)
        g.slot_mapping[:B].copy_(batch.slot_mapping)
        g.kv_slots.zero_()
        g.kv_slots[:B, :K].copy_(group.kv_slots)
        g.mask.zero_()
        if group.mask is None:
            g.mask[:B, ..., :K] = True
        else:
            g.mask[:B, ..., :K].copy_(group.mask)
        if pad:  # see the module docstring
            for buf in (g.input_ids, g.positions, g.slot_mapping, g.kv_slots, g.mask):
                buf[B:].copy_(buf[:1].expand_as(buf[B:]))
        g.graph.replay()
        return g.logits[:B].clone()

    def _graph(self, B: int, K: int) -> _Graph:
        if (B, K) in self.graphs:
            return self.graphs[(B, K)]
        dev = self.device
        g = _Graph(
            torch.cuda.CUDAGraph(),
            torch.zeros(B, dtype=torch.long, device=dev),
            torch.zeros(B, dtype=torch.long, device=dev),
            torch.zeros(B, dtype=torch.long, device=dev),
            torch.zeros(B, K, dtype=torch.long, device=dev),
            torch.ones(B, 1, 1, K, dtype=torch.bool, device=dev),
            torch.empty(0),
        )
        rows = torch.arange(B, device=dev)
        attn = AttentionBatch(g.slot_mapping, [], DecodeGroup(rows, g.kv_slots, g.mask, all_rows=True))
        # Warm up on a side stream (allocator, cuBLAS workspaces), as torch.cuda.graphs asks.
        # Those real runs write K/V to slot 0, which may belong to a live page: keep and restore it.
        saved = self.kv.k[:, 0].clone(), self.kv.v[:, 0].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.model(g.input_ids, g.positions, attn, self.kv)
        torch.cuda.current_stream().wait_stream(stream)
        self.kv.k[:, 0], self.kv.v[:, 0] = saved
        with torch.cuda.graph(g.graph, pool=self.pool):
            g.logits = self.model(g.input_ids, g.positions, attn, self.kv)
        self.graphs[(B, K)] = g
        return g
