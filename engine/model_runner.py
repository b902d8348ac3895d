"""Turns a scheduled batch into tensors, runs the model once, samples. Owns the KV tensors."""

from __future__ import annotations

import numpy as np
import torch

from engine.models.attention import AttentionBatch, DecodeGroup, KVCache, PrefillSegment
from engine.models.llama import LlamaForCausalLM
from engine.sampling import Sampled, Sampler
from engine.scheduler import Batch
from engine.sequence import Sequence


def allocate_kv(model: LlamaForCausalLM, num_pages: int, page_size: int, dtype: torch.dtype) -> KVCache:
    cfg = model.config
    shape = (cfg.num_layers, num_pages * page_size, cfg.num_kv_heads, cfg.head_dim)
    device = model.embed_tokens.weight.device
    return KVCache(
        torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
    )


def kv_bytes_per_token(model: LlamaForCausalLM, dtype: torch.dtype) -> int:
    cfg = model.config
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.tensor([], dtype=dtype).element_size()


# At least this many decoding sequences sharing at least this many leading keys attend to them once,
# in one batch (cascade attention): (rows, tokens). Measured on 2 cores, bf16, int4, against each row
# attending to all its keys (docs/benchmarks.md, cascade attention). The Python path
# (attention._cascade): 2 rows on 2,000 shared tokens 0.64-0.84x (slower), 3 rows on 1,000 1.01x,
# 4 rows on 512 1.06x and on 2,000 1.10x, 8 rows on 256 1.05-1.21x and on 2,000 2.5-2.65x, 16 rows
# on 1,000 1.69x. The fused decode step, whose attention without a cascade is already fast: 4 rows
# on 512 or 2,000 0.92-0.98x, 8 rows on 256 0.89-1.06x, on 512 0.92-1.01x, on 1,000 1.38-1.45x, on
# 2,000 1.11-1.18x, 16 rows on 256 0.86-1.07x, on 1,000 1.19-1.21x.
CASCADE_MIN = (4, 256)
FUSED_CASCADE_MIN = (8, 768)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv: KVCache, page_size: int) -> None:
        self.model = model
        self.kv = kv
        self.page_size = page_size
        self.device = model.embed_tokens.weight.device
        self.sampler = Sampler(self.device)
        self._offsets = np.arange(page_size, dtype=np.int64)
        # Pure decode steps replay CUDA graphs (engine.models.decode_graphs) on CUDA.
        self.cuda_graphs = self.device.type == "cuda"
        # Decodes sharing a long cached prefix attend to it once (cascade attention; CPU kernels): in
        # the fused decode step, or on the Python path (attention._cascade), from (rows, tokens).
        self.cascade = self.device.type == "cpu"
        self.cascade_min = FUSED_CASCADE_MIN if model.fused_decode else CASCADE_MIN
        self._graphs = None  # DecodeGraphs, built on the first decode step that uses them

    def _shared_prefix_tokens(self, seqs: list[Sequence], slots: list[np.ndarray]) -> int:
        """Keys every decoding sequence shares (the same cached pages at the start of each page
        table), if at least ``cascade_min`` (rows, tokens); else 0."""
        min_rows, min_tokens = self.cascade_min
        if len(seqs) < min_rows:
            return 0
        first = seqs[0].pages
        shared = min(len(s) - 1 for s in slots) // self.page_size  # whole pages before every last key
        for seq in seqs[1:]:
            pages = seq.pages
            shared = next((i for i in range(shared) if pages[i] != first[i]), shared)
            if shared * self.page_size < min_tokens:
                return 0
        return shared * self.page_size

    def _slots(self, seq: Sequence, end: int) -> np.ndarray:
        """Slots of tokens ``0 .. end-1`` of ``seq``."""
        pages = np.asarray(seq.pages[: -(-end // self.page_size)], dtype=np.int64)
        return (pages[:, None] * self.page_size + self._offsets).reshape(-1)[:end]

    def prepare(
        self, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch, torch.Tensor, list[Sequence]]:
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slot_mapping: list[np.ndarray] = []
        prefills: list[PrefillSegment] = []
        decode_rows: list[int] = []
        decode_slots: list[np.ndarray] = []
        decode_seqs: list[Sequence] = []
        logits_rows: list[int] = []
        sampled: list[Sequence] = []
        row = 0
        for chunk in batch.chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.length
            end = start + n
            ids.extend(seq.token_ids[start:end])
            positions.append(np.arange(start, end, dtype=np.int64))
            slots = self._slots(seq, end)
            slot_mapping.append(slots[start:])
            if n == 1 and start > 0:
                decode_rows.append(row)
                decode_slots.append(slots)
                decode_seqs.append(seq)
            else:
                mask = None
                if start > 0:  # cached prefix: query i sits at position start+i and sees keys <= it
                    mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
                    mask = mask.to(self.device)
                prefills.append(PrefillSegment(row, n, torch.from_numpy(slots).to(self.device), mask))
            if chunk.samples:
                logits_rows.append(row + n - 1)
                sampled.append(seq)
            row += n

        decode = None
        if decode_rows:
            prefix_slots = None
            shared = self._shared_prefix_tokens(decode_seqs, decode_slots) if self.cascade else 0
            if shared:  # cascade attention: the shared keys once, each row's own keys after them
                prefix_slots = torch.from_numpy(decode_slots[0][:shared]).to(self.device)
                decode_slots = [s[shared:] for s in decode_slots]
            lengths = np.array([len(s) for s in decode_slots])
            padded = np.zeros((len(decode_slots), lengths.max()), dtype=np.int64)
            for r, s in enumerate(decode_slots):
                padded[r, : len(s)] = s
            mask = None
            if (lengths != lengths.max()).any():
                mask = torch.from_numpy(np.arange(lengths.max())[None, :] < lengths[:, None])[
                    :, None, None, :
                ]
                if prefix_slots is not None:  # the cascade's kernel takes an additive bias
                    mask = torch.zeros(mask.shape, dtype=self.kv.k.dtype).masked_fill_(~mask, float("-inf"))
                mask = mask.to(self.device)
            decode = DecodeGroup(
                torch.tensor(decode_rows, device=self.device),
                torch.from_numpy(padded).to(self.device),
                mask,
                all_rows=len(decode_rows) == row,  # decodes only: their rows are 0..B-1 in order
                prefix_slots=prefix_slots,
            )
        attn = AttentionBatch(
            torch.from_numpy(np.concatenate(slot_mapping)).to(self.device), prefills, decode
        )
        return (
            torch.tensor(ids, dtype=torch.long, device=self.device),
            torch.from_numpy(np.concatenate(positions)).to(self.device),
            attn,
            torch.tensor(logits_rows, dtype=torch.long, device=self.device),
            sampled,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBatch,
        logits_rows: torch.Tensor,
    ) -> torch.Tensor:
        """Logits ``[N, V]`` of the rows that sample; pure decode steps on CUDA replay a CUDA graph."""
        if self.cuda_graphs and attn.decode is not None and attn.decode.all_rows:
            if self._graphs is None:
                from engine.models.decode_graphs import DecodeGraphs  # CUDA only: imported lazily

                self._graphs = DecodeGraphs(self.model, self.kv, max_keys=self.kv.k.shape[1])
            if self._graphs.fits(attn):  # every row of a decode step samples: logits_rows == 0..B-1
                return self._graphs.run(input_ids, positions, attn)
        return self.model(input_ids, positions, attn, self.kv, logits_rows)

    def run(self, batch: Batch) -> dict[Sequence, Sampled | Exception]:
        """The next token of each sequence this step samples, or the exception its sampling raised.
        A sequence sampling its prompt's last logits for the first time with other choices waiting
        (``seq.forks``) shares that row with them: each fork gets its own first token from it.
        Raises if the forward pass itself fails (then the whole batch has no result)."""
        input_ids, positions, attn, logits_rows, sampled = self.prepare(batch)
        logits = self.forward(input_ids, positions, attn, logits_rows)
        if not sampled:  # only partial prefill chunks this step: KV is written, nothing to sample
            return {}
        forks = [(row, f) for row, s in enumerate(sampled) for f in s.forks if not f.finished]
        if forks:  # logits: [N + forks, V], fork rows copied from their parent's
            rows = list(range(len(sampled))) + [row for row, _ in forks]
            logits = logits[torch.tensor(rows, device=logits.device)]
            sampled = sampled + [f for _, f in forks]
        return dict(zip(sampled, self.sampler.sample(logits, sampled), strict=True))

    def copy_pages(self, pairs: list[tuple[int, int]]) -> None:
        """Copy the KV of page ``src`` into page ``dst`` for each pair, in every layer (a fork's
        private copy of its parent's partly filled last page)."""
        if not pairs:
            return
        ps = self.page_size
        src = torch.tensor([s * ps + o for s, _ in pairs for o in range(ps)], device=self.device)
        dst = torch.tensor([d * ps + o for _, d in pairs for o in range(ps)], device=self.device)
        self.kv.k[:, dst] = self.kv.k[:, src]
        self.kv.v[:, dst] = self.kv.v[:, src]
