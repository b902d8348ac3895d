"""What the engine's forward steps cost: each step observed once, read by everything that needs a speed.

``LLMEngine.step`` hands every forward pass to one ``StepTimes`` (its tokens, how many of them are
decode rows, its seconds). Three readers take what they need from those same observations:

1. ``budget`` (``--itl-slo-ms``): the most tokens a step carrying decodes may hold within an inter-token
   latency SLO, from the line ``fit`` (Sarathi-Serve's "token budget from the SLO", learned online
   instead of profiled offline);
2. ``prefill_tokens_per_s``: what the KV tiers weigh a load-back's copy against (``engine.kv.load_cost``);
3. ``load_profile()``: the prefill rate and the decode step time per batch size that ``GET /load_profile``
   publishes (``cache.planning.load_profile``: the gateway's P:D advice and tier-hit weighting).

The line. Every running decode waits for the whole step it rides in, so a step's time is every decoding
sequence's inter-token latency. Steps cost about ``t = a + b * tokens``: ``a`` the fixed part (Python,
kernel launches, sampling, reading the weights once), ``b`` each batched token's share. The line is fitted
on the steps the engine actually runs, and built this way:

* Bounded memory, no covariance wind-up: observations go into buckets by token count (powers of two:
  1, 2-3, 4-7, ... up to the cap, so at most ``log2(max_batch_tokens) + 1`` of them), each an EWMA of
  its mean tokens and mean seconds. The line is a weighted least-squares fit through the bucket means.
  A bucket's weight halves every ``half_life_steps`` steps it goes unseen, so a machine that got
  slower is not outvoted by stale sizes, yet never reaches zero: a long run of decode-only steps
  refreshes one bucket and leaves the slope that prefill steps taught in theirs (an exponentially
  forgetting RLS would lose it and swing).
* Robust to the first samples: a bucket's first ``1/alpha`` samples are a plain running mean (the slow
  first forward pass of a cold engine washes out as 1/n), and nothing is fitted before ``min_samples``
  steps (``budget`` returns the static cap meanwhile).
* Robust to outliers: a sample more than ``spike`` times its bucket's mean is clipped to that, so one
  descheduled step moves the mean by at most ``alpha * (spike - 1)``; a machine that really got slower
  still moves it geometrically, within a few steps.
* Conservative while it cannot see a slope: with one bucket (or means closer than 2x in tokens) the
  line goes through the origin, ``t = (t_mean / tokens_mean) * tokens``, which overstates ``b``. The
  budget starts near its floor and grows as steps at the new size are measured, instead of betting a
  whole cap-sized prefill chunk on an extrapolation.
* Corrected where the SLO applies: the line is a compromise over every step size, and a step that
  carries decodes may cost more or less than its tokens say (attention over long prefixes, more
  rows to sample). So steps with decodes also keep the EWMA mean and variance of their measured over
  predicted time (each ratio clipped to ``[1/spike, spike]``), and ``budget`` fits the line to
  ``slo / (mean + margin_sigmas * std)``: a feedback loop on the very steps whose time is every
  decode's inter-token latency, aiming most of them, not half, within the SLO.

The rates (Dynamo's SLA planner's two curves, measured on live traffic instead of an offline sweep):

* Prefill: tokens per second over steps that compute at least ``min_rate_prompt_tokens`` prompt tokens
  (smaller steps are dominated by fixed per-step costs and say little of prefill speed). A step that
  also carries decode rows counts them as tokens: under chunked prefill that is what a prefill pays for.
* Decode: seconds per step over steps that only decode, kept per batch-size bucket (the line's powers
  of two) with the bucket's mean batch, so each bucket is one measured point of the curve "step time as
  a function of batch size".

Every figure is averaged the same way: a running mean over its first ``1/alpha`` samples, then an EWMA
weighting the newest by ``alpha``, so they all track a warming or contended machine.

Not thread-safe: only the thread that steps the engine calls ``observe``, ``budget`` and
``load_profile``; the ``LoadProfile`` snapshots it hands out are immutable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cache.planning.load_profile import DecodePoint, LoadProfile


@dataclass(frozen=True)
class StepTimeFit:
    fixed_s: float  # a: seconds every step costs
    per_token_s: float  # b: seconds each batched token adds (> 0)

    def seconds(self, tokens: int) -> float:
        return self.fixed_s + self.per_token_s * tokens

    def tokens_within(self, seconds: float) -> int:
        """The most tokens whose predicted step time is at most ``seconds`` (may be <= 0)."""
        return math.floor((seconds - self.fixed_s) / self.per_token_s)


class StepTimes:
    """The engine's forward steps, observed once each (``observe``) and read as the SLO budget, the
    prefill rate and the published load profile."""

    def __init__(
        self,
        max_batch_tokens: int,
        min_prefill_tokens: int = 16,
        max_batch: int | None = None,
        alpha: float = 0.2,
        spike: float = 2.0,
        min_samples: int = 3,
        max_weight: int = 8,
        half_life_steps: float = 100.0,
        margin_sigmas: float = 2.0,
        min_rate_prompt_tokens: int = 32,
    ) -> None:
        """``max_batch_tokens``: the static cap, and the budget until a fit exists; ``min_prefill_tokens``:
        what every budget leaves for prefill beyond the step's decodes (a page), so prompts always
        progress however tight the SLO; ``max_batch``: the most sequences the scheduler runs at once
        (published with the profile); ``max_weight``: a bucket's weight in the fit is its sample count
        up to this, so a bucket seen once counts less than one seen all the time, but not 1,000x less."""
        assert max_batch_tokens >= 1 and min_prefill_tokens >= 1 and 0 < alpha <= 1 and spike > 1
        self.max_batch_tokens, self.min_prefill_tokens = max_batch_tokens, min_prefill_tokens
        self.max_batch = max_batch
        self.alpha, self.spike, self.min_samples, self.max_weight = alpha, spike, min_samples, max_weight
        self.half_life_steps, self.margin_sigmas = half_life_steps, margin_sigmas
        self.min_rate_prompt_tokens = min_rate_prompt_tokens
        self.num_samples = 0
        self._ratio_mean, self._ratio_var = 1.0, 0.0  # measured / predicted, steps with decodes (EWMA)
        self._buckets: dict[int, _Bucket] = {}  # every step, by the bit length of its tokens
        self._decode: dict[int, _Bucket] = {}  # decode-only steps, by the bit length of their batch
        self._prefill_rate: float | None = None  # tokens/s over steps with enough prompt tokens
        self._prefill_steps = 0
        self._fit: StepTimeFit | None = None
        self._stale = False
        self._profile: LoadProfile | None = None  # None: a figure changed since the last snapshot

    def observe(self, tokens: int, seconds: float, decodes: int = 0) -> None:
        """One step of ``tokens`` batched tokens, ``decodes`` of them decode rows (one token for each
        decoding sequence; the rest are prompt tokens), that took ``seconds``."""
        if tokens < 1 or not (seconds > 0 and math.isfinite(seconds)):
            return
        if decodes and (fit := self.fit) is not None:  # the line this step's budget came from
            deviation = min(self.spike, max(1 / self.spike, seconds / fit.seconds(tokens))) - self._ratio_mean
            self._ratio_mean += self.alpha * deviation
            self._ratio_var = (1 - self.alpha) * (self._ratio_var + self.alpha * deviation**2)
        self.num_samples += 1
        self._stale = True
        self._add(self._buckets, tokens, seconds, clip=True)
        prompt_tokens = tokens - decodes
        if prompt_tokens >= self.min_rate_prompt_tokens:
            self._prefill_steps += 1
            self._prefill_rate = self._mean(self._prefill_rate, tokens / seconds, self._prefill_steps)
            self._profile = None
        elif prompt_tokens == 0:
            self._add(self._decode, tokens, seconds, clip=False)  # unclipped: a slow step is real latency
            self._profile = None

    @property
    def prefill_tokens_per_s(self) -> float | None:
        """The measured prefill rate, or None before a step with enough prompt tokens."""
        return self._prefill_rate

    def load_profile(self) -> LoadProfile:
        """The prefill rate and decode points as ``GET /load_profile`` publishes them (``kv_load`` is the
        tiers' to add); the same object until a step changes one of them."""
        if self._profile is None:
            points = tuple(
                DecodePoint(float(b.tokens), b.seconds, b.count) for _, b in sorted(self._decode.items())
            )
            self._profile = LoadProfile(self._prefill_rate, points, self.max_batch)
        return self._profile

    @property
    def fit(self) -> StepTimeFit | None:
        """The current line, or None before ``min_samples`` steps."""
        if self._stale:
            self._fit, self._stale = self._fit_line(), False
        return self._fit

    @property
    def decode_step_factor(self) -> float:
        """What the line's prediction is multiplied by for a step that carries decodes: the mean
        measured/predicted ratio of such steps plus ``margin_sigmas`` standard deviations."""
        return self._ratio_mean + self.margin_sigmas * math.sqrt(self._ratio_var)

    @property
    def num_buckets(self) -> int:
        return len(self._buckets)

    def budget(self, slo_s: float, decodes: int = 0) -> int:
        """Tokens a step with ``decodes`` decode rows may carry: the most the fit (times the factor)
        says finish within ``slo_s``, at least ``decodes + min_prefill_tokens`` (so an SLO below the
        cost of that floor is missed rather than starving prompts), at most ``max_batch_tokens``."""
        fit = self.fit
        if fit is None:
            return self.max_batch_tokens
        floor = decodes + self.min_prefill_tokens
        return min(self.max_batch_tokens, max(floor, fit.tokens_within(slo_s / self.decode_step_factor)))

    def _mean(self, old: float | None, new: float, count: int) -> float:
        """A running mean over the first ``1/alpha`` samples, an EWMA after."""
        return new if old is None else old + max(self.alpha, 1 / count) * (new - old)

    def _add(self, buckets: dict[int, _Bucket], tokens: int, seconds: float, clip: bool) -> None:
        bucket = buckets.get(key := tokens.bit_length())
        if bucket is None:
            buckets[key] = _Bucket(tokens, seconds, 1, self.num_samples)
            return
        bucket.count += 1
        bucket.last_seen = self.num_samples
        if clip:
            seconds = min(seconds, self.spike * bucket.seconds)
        bucket.tokens = self._mean(bucket.tokens, tokens, bucket.count)
        bucket.seconds = self._mean(bucket.seconds, seconds, bucket.count)

    def _fit_line(self) -> StepTimeFit | None:
        if self.num_samples < self.min_samples:
            return None
        # Errors count relative to the step's time (weight / t^2): an SLO is a time budget, and the
        # convex tail of big prefill chunks (attention within a chunk grows as its square) must not
        # bend the line where the budgets live, among steps of tens of tokens.
        points = [(b.tokens, b.seconds, self._weight(b) / b.seconds**2) for b in self._buckets.values()]
        sw = sum(w for _, _, w in points)
        sxx0 = sum(w * x * x for x, _, w in points)
        through_origin = StepTimeFit(0.0, sum(w * x * t for x, t, w in points) / sxx0)
        xs = [x for x, _, _ in points]
        if max(xs) < 2 * min(xs):  # no spread in tokens: the slope is not identifiable
            return through_origin
        x_mean = sum(w * x for x, _, w in points) / sw
        t_mean = sum(w * t for _, t, w in points) / sw
        sxx = sum(w * (x - x_mean) ** 2 for x, _, w in points)
        sxt = sum(w * (x - x_mean) * (t - t_mean) for x, t, w in points)
        slope = sxt / sxx
        intercept = t_mean - slope * x_mean
        if slope <= 0 or intercept < 0:  # not physics (noise, drift): fall back to the line through
            return through_origin  # the origin; the decode step factor corrects it where budgets are taken
        return StepTimeFit(intercept, slope)

    def _weight(self, bucket: _Bucket) -> float:
        age = self.num_samples - bucket.last_seen
        return min(bucket.count, self.max_weight) * max(1e-3, 0.5 ** (age / self.half_life_steps))


@dataclass
class _Bucket:
    tokens: float  # mean tokens of the bucket's steps (for decode points: the mean batch)
    seconds: float  # their mean time (spikes clipped in the line's buckets)
    count: int
    last_seen: int  # the sample number when the bucket was last updated
