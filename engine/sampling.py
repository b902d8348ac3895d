"""The sampler: greedy, temperature, top-k, top-p, per-request seeds (parameters: ``cache.api.sampling``)."""

from __future__ import annotations

import torch

from cache.api.sampling import SamplingParams


class Sampler:
    """Samples one token per logits row. Rows are independent; a seeded row is reproducible
    whatever else shares its batch, because each seeded request owns its own generator. A row whose
    sampling raises yields its exception instead of a token: one request's failure is its own."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def sample(
        self, logits: torch.Tensor, params: list[SamplingParams], request_ids: list[str]
    ) -> list[int | Exception]:
        # logits: [N, V] float32
        out: list[int | Exception] = logits.argmax(dim=-1).tolist()
        for row, (p, rid) in enumerate(zip(params, request_ids, strict=True)):
            if p.greedy:
                continue
            try:
                out[row] = self._sample_row(logits[row], p, rid)
            except Exception as exc:  # reported to this request alone by the engine
                out[row] = exc
        return out

    def _sample_row(self, logits: torch.Tensor, p: SamplingParams, request_id: str) -> int:
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
            generator = self._generators.get(request_id)
            if generator is None:
                generator = torch.Generator(device=probs.device).manual_seed(p.seed)
                self._generators[request_id] = generator
        return int(torch.multinomial(probs, 1, generator=generator).item())
