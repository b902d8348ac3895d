"""Sampling parameters: what a request asks of the sampler, validated where it is built. Torch-free."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SAMPLING_EPS = 1e-5  # vLLM's _SAMPLING_EPS: a lower temperature samples greedily (no division by ~0)
SEED_RANGE = (-(2**63), 2**63 - 1)  # a torch generator's seed (vLLM bounds ``seed`` the same way)
MAX_N = 16  # choices per request: each one is a running sequence
MAX_TOP_LOGPROBS = 20  # OpenAI's bound for chat ``top_logprobs`` (completions allow 5)
PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's presence/frequency penalties
MAX_REPETITION_PENALTY = 100.0  # (0, 100]: beyond ~10 a seen token is banned anyway; keeps logits finite
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's
MAX_LOGIT_BIAS = 1024  # entries per request (each is a device tensor element held while it runs)


@dataclass(frozen=True)
class SamplingParams:
    """Invariant: every instance can be sampled without overflow or division by ~0 (checked here, so
    a request that slipped past ``cache.api.requests`` still cannot break the sampler).

    The order the sampler applies them in is vLLM's: logit bias, then repetition, frequency and
    presence penalties, then temperature, top-k, top-p. ``logprobs`` are read before all of that, from
    the model's raw distribution (vLLM's default ``raw_logprobs``)."""

    max_tokens: int = 16
    temperature: float = 1.0  # below SAMPLING_EPS (0 included) = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = whole vocabulary
    seed: int | None = None  # choice i of n uses seed + i
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1  # choices sampled from one prefill of the prompt
    logprobs: int | None = None  # None: none; k: the sampled token's and the k most likely tokens'
    presence_penalty: float = 0.0  # OpenAI: minus this for every token already in the output
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's count in the output
    repetition_penalty: float = 1.0  # HF/vLLM: logits of prompt and output tokens / it (if > 0) or * it
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), ids unique
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError("temperature must be a finite number >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError("top_k must be -1 (disabled) or >= 1")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not PENALTY_RANGE[0] <= getattr(self, name) <= PENALTY_RANGE[1]:
                raise ValueError(f"{name} must be in [{PENALTY_RANGE[0]}, {PENALTY_RANGE[1]}]")
        if not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY}]")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries")
        ids = [token for token, _ in self.logit_bias]
        if len(set(ids)) != len(ids) or any(token < 0 for token in ids):
            raise ValueError("logit_bias token ids must be unique and >= 0")
        if not all(LOGIT_BIAS_RANGE[0] <= bias <= LOGIT_BIAS_RANGE[1] for _, bias in self.logit_bias):
            raise ValueError(f"logit_bias values must be in [{LOGIT_BIAS_RANGE[0]}, {LOGIT_BIAS_RANGE[1]}]")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """Any of the penalties, which need the request's token counts."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def adjusts_logits(self) -> bool:
        """Logit bias or penalties: the logits change before sampling, greedy or not."""
        return bool(self.logit_bias) or self.penalized
