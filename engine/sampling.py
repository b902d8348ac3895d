"""The sampler: logit bias, penalties, greedy, temperature, top-k, top-p, per-request seeds, logprobs
(parameters and their order: ``cache.api.sampling``).

Plain rows (no bias, no penalty, no logprobs) cost what they always did: one batched argmax, plus
one small sampling call per non-greedy row. Only rows that ask for more pay for it, and that work is
batched over those rows: the bias is one scatter, the penalties one pass over a ``[P, V]`` block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cache.api.sampling import SamplingParams
from engine.sequence import Sequence

MIN_LOGPROB = -9999.0  # what vLLM reports for -inf (JSON has no infinity)


@dataclass(frozen=True)
class TokenLogprobs:
    """The sampled token's log-probability and the ``k`` most likely tokens' (most likely first), in
    the model's raw distribution: before logit bias, penalties, temperature and top-k/top-p (vLLM's
    default ``raw_logprobs``), so they describe the model, whatever the request's sampling."""

    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Sampled:
    token: int
    logprobs: TokenLogprobs | None = None  # when the request asked for them


@dataclass
class _RowState:
    """What the sampler keeps for one sequence between steps (only for sequences that need it)."""

    generator: torch.Generator | None = None  # seeded sequences
    counts: torch.Tensor | None = None  # [V] float32: output token counts (penalties)
    seen: torch.Tensor | None = None  # [V] bool: prompt and output tokens (repetition penalty)
    num_counted: int = 0  # output tokens already in ``counts`` and ``seen``
    bias_ids: torch.Tensor | None = None  # [K] long
    bias_values: torch.Tensor | None = None  # [K] float32


class Sampler:
    """Samples one token per logits row. Rows are independent; a seeded row is reproducible
    whatever else shares its batch, because each seeded sequence owns its own generator. A row whose
    sampling raises yields its exception instead of a token: one request's failure is its own.

    State (generators, token counts, bias tensors) is keyed by the ``Sequence`` object, so choices of
    one request and requests that reuse an id never share it; ``forget`` drops it when a sequence ends.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._states: dict[Sequence, _RowState] = {}

    def forget(self, seq: Sequence) -> None:
        self._states.pop(seq, None)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[Sampled | Exception]:
        # logits: [N, V] float32, the model's raw output; row i belongs to seqs[i]
        params = [s.sampling for s in seqs]
        with_logprobs = [r for r, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = logits[with_logprobs].log_softmax(dim=-1) if with_logprobs else None
        tokens: list[int | Exception] = logits.argmax(dim=-1).tolist()
        adjusted: dict[int, torch.Tensor] = {}  # row -> its logits after bias and penalties
        rows = [r for r, p in enumerate(params) if p.adjusts_logits]
        if rows:
            block, errors = self._adjusted(logits, rows, seqs)  # block: [len(rows), V]
            best = block.argmax(dim=-1).tolist()
            for j, r in enumerate(rows):
                if j in errors:
                    tokens[r] = errors[j]
                else:
                    adjusted[r], tokens[r] = block[j], best[j]  # the greedy token, unless it samples
        for r, p in enumerate(params):
            if p.greedy or isinstance(tokens[r], Exception):
                continue
            try:
                row = adjusted[r] if r in adjusted else logits[r]
                tokens[r] = self._sample_row(row, p, seqs[r])
            except Exception as exc:  # reported to this request alone by the engine
                tokens[r] = exc
        out: list[Sampled | Exception] = [t if isinstance(t, Exception) else Sampled(t) for t in tokens]
        if raw_logprobs is not None:
            self._attach_logprobs(out, with_logprobs, raw_logprobs, params)
        return out

    # -- logit bias and penalties (vectorised over the rows that use them) -------------------------
    def _adjusted(
        self, logits: torch.Tensor, rows: list[int], seqs: list[Sequence]
    ) -> tuple[torch.Tensor, dict[int, Exception]]:
        """The adjusted logits of ``rows`` (a copy: ``logits`` is not changed), and the rows whose
        adjustment failed (by position in ``rows``). If the batched pass fails, each row is redone
        alone, so that only the row at fault gets the exception."""
        try:
            return self._adjust(logits[rows], [seqs[r] for r in rows]), {}
        except Exception:
            block, errors = logits[rows], {}
            for j, r in enumerate(rows):
                try:
                    block[j] = self._adjust(logits[[r]], [seqs[r]])[0]
                except Exception as exc:
                    errors[j] = exc
            return block, errors

    def _adjust(self, block: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        # block: [P, V] float32 (a copy, changed in place)
        params = [s.sampling for s in seqs]
        biased = [j for j, p in enumerate(params) if p.logit_bias]
        if biased:
            states = [self._bias_state(seqs[j]) for j in biased]
            rows = torch.cat(
                [torch.full_like(st.bias_ids, j) for j, st in zip(biased, states, strict=True)]  # type: ignore[arg-type]
            )
            ids = torch.cat([st.bias_ids for st in states])  # type: ignore[misc]
            values = torch.cat([st.bias_values for st in states])  # type: ignore[misc]
            block.index_put_((rows, ids), values, accumulate=True)
        penalized = [j for j, p in enumerate(params) if p.penalized]
        if penalized:
            vocab = block.shape[-1]
            states = [self._count_state(seqs[j], vocab) for j in penalized]
            every_row = len(penalized) == len(seqs)
            index = torch.tensor(penalized, device=block.device)
            sub = block if every_row else block[index]  # [P', V]
            counts = torch.stack([st.counts for st in states])  # type: ignore[misc]
            if any(params[j].repetition_penalty != 1 for j in penalized):
                seen = torch.stack([st.seen for st in states])  # type: ignore[misc]
                rep = self._column([params[j].repetition_penalty for j in penalized])
                sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
            frequency = self._column([params[j].frequency_penalty for j in penalized])
            presence = self._column([params[j].presence_penalty for j in penalized])
            sub = sub.sub_(frequency * counts).sub_(presence * (counts > 0))
            if every_row:
                return sub
            block[index] = sub
        return block

    def _column(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)[:, None]

    def _state(self, seq: Sequence) -> _RowState:
        state = self._states.get(seq)
        if state is None:
            state = self._states[seq] = _RowState()
        return state

    def _bias_state(self, seq: Sequence) -> _RowState:
        state = self._state(seq)
        if state.bias_ids is None:  # built once per sequence: the bias never changes
            ids, values = zip(*seq.sampling.logit_bias, strict=True)
            state.bias_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
            state.bias_values = torch.tensor(values, dtype=torch.float32, device=self.device)
        return state

    def _count_state(self, seq: Sequence, vocab: int) -> _RowState:
        """The sequence's token counts, brought up to date with its output so far (usually one new
        token per step; after a fork or a preemption, whatever it gained since)."""
        state = self._state(seq)
        if state.counts is None:
            state.counts = torch.zeros(vocab, dtype=torch.float32, device=self.device)
            state.seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            state.seen[torch.tensor(seq.prompt_ids, device=self.device)] = True
        new = seq.output_ids[state.num_counted :]
        if new:
            ids = torch.tensor(new, device=self.device)
            state.counts.index_put_((ids,), torch.ones_like(ids, dtype=torch.float32), accumulate=True)
            state.seen[ids] = True  # type: ignore[index]
            state.num_counted = len(seq.output_ids)
        return state

    # -- one row ------------------------------------------------------------------------------------
    def _sample_row(self, logits: torch.Tensor, p: SamplingParams, seq: Sequence) -> int:
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest set whose mass reaches top_p (the first token always stays)
            drop = sorted_probs.cumsum(0) - sorted_probs > p.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        generator = None
        if p.seed is not None:
            state = self._state(seq)
            if state.generator is None:
                state.generator = torch.Generator(device=probs.device).manual_seed(p.seed)
            generator = state.generator
        return int(torch.multinomial(probs, 1, generator=generator).item())

    # -- logprobs -----------------------------------------------------------------------------------
    @staticmethod
    def _attach_logprobs(
        out: list[Sampled | Exception],
        rows: list[int],
        raw_logprobs: torch.Tensor,  # [R, V] log_softmax of the raw logits of ``rows``
        params: list[SamplingParams],
    ) -> None:
        chosen = torch.tensor(
            [o.token if isinstance(o, Sampled) else 0 for o in (out[r] for r in rows)],
            device=raw_logprobs.device,
        )
        sampled = raw_logprobs.gather(1, chosen[:, None])[:, 0].tolist()
        k = max(params[r].logprobs or 0 for r in rows)
        top_values: list[list[float]] = [[] for _ in rows]
        top_ids: list[list[int]] = [[] for _ in rows]
        if k > 0:
            top = raw_logprobs.topk(min(k, raw_logprobs.shape[-1]), dim=-1)
            top_values, top_ids = top.values.tolist(), top.indices.tolist()
        for i, r in enumerate(rows):
            result = out[r]
            if isinstance(result, Exception):
                continue
            n = params[r].logprobs or 0
            top_pairs = tuple(
                (token, _reportable(value))
                for token, value in zip(top_ids[i][:n], top_values[i][:n], strict=True)
            )
            out[r] = Sampled(result.token, TokenLogprobs(_reportable(sampled[i]), top_pairs))


def _reportable(logprob: float) -> float:
    """-inf (and NaN, should a model produce it) as vLLM reports them: a finite floor."""
    return logprob if logprob >= MIN_LOGPROB else MIN_LOGPROB
