"""What a worker measures about its own speed: its prefill rate and its decode step time per batch size.

These are the two curves Dynamo's SLA planner takes from an offline profiling sweep (prefill throughput
at a prompt length, decode throughput at an inter-token latency); here every engine measures them on
the traffic it serves (``engine.step_times``, the one measure of its forward steps), so the P:D advice
(``cache.planning.pd_advice``) follows the hardware and the model actually deployed.

* Prefill: tokens per second over forward steps that compute enough prompt tokens to say something of
  prefill speed (decode rows riding in them count as tokens: under chunked prefill that is what a
  prefill pays for).
* Decode: seconds per step over steps that only decode, per batch-size bucket (powers of two: 1, 2-3,
  4-7, ...) with the bucket's mean batch, so each bucket is one measured point of the curve "step time
  as a function of batch size". A step's time is the inter-token latency of every sequence in it.
* KV tiers (``KVLoadCost``, only with the hierarchical cache): seconds per prompt token to load a prefix
  back from the host tier and from the disk tier, and to recompute it, as the engine's load-back
  decision weighs them (``engine.kv.load_cost``). The gateway weighs a lower-tier hit by what it saves:
  ``1 - load / recompute`` of a device hit.

``LoadProfile`` is an immutable snapshot; ``to_json`` / ``from_json`` is the wire form of
``GET /load_profile``: the gateway reads it from workers it does not trust, so ``from_json`` accepts
only well-formed, finite, positive figures and returns None otherwise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from cache.wire.tiers import Tier

MAX_DECODE_POINTS = 32  # 2**31 sequences per step: any real batch fits; a bigger list is not a profile


@dataclass(frozen=True)
class DecodePoint:
    batch: float  # mean number of decoding sequences in this bucket's steps
    step_s: float  # seconds per step (EWMA): every sequence's inter-token latency at this batch
    steps: int  # steps observed in this bucket


@dataclass(frozen=True)
class KVLoadCost:
    """Seconds per prompt token to bring a cached prefix back to the device from each lower tier, and to
    recompute it instead; None until measured (a path not taken yet)."""

    prefill_s_per_token: float | None = None  # recompute (the engine's measured prefill rate)
    host_s_per_token: float | None = None  # host -> device copy
    disk_s_per_token: float | None = None  # disk read, then the copy
    min_load_tokens: int = 0  # a lower-tier prefix shorter than this is recomputed, never loaded

    def saved_fraction(self, tier: Tier) -> float | None:
        """What a hit in ``tier`` saves, as a fraction of a device hit: ``1 - load / recompute`` clamped
        to [0, 1] (0: loading costs as much as recomputing, so the engine recomputes); None until both
        are measured."""
        if tier is Tier.DEVICE:
            return 1.0
        load = self.host_s_per_token if tier is Tier.HOST else self.disk_s_per_token
        if load is None or self.prefill_s_per_token is None:
            return None
        return min(1.0, max(0.0, 1.0 - load / self.prefill_s_per_token))

    @classmethod
    def from_json(cls, data: object) -> KVLoadCost | None:
        """None when ``data`` is not one (each figure None or finite and positive)."""
        if not isinstance(data, dict):
            return None
        figures = {f.name: data.get(f.name) for f in fields(cls) if f.name != "min_load_tokens"}
        if not all(v is None or _positive(v) for v in figures.values()):
            return None
        min_load = data.get("min_load_tokens", 0)
        if not (_is_int(min_load) and min_load >= 0):
            return None
        return cls(
            **{k: None if v is None else float(v) for k, v in figures.items()}, min_load_tokens=min_load
        )


@dataclass(frozen=True)
class LoadProfile:
    prefill_tokens_per_s: float | None = None  # None: no large enough prefill step seen yet
    decode: tuple[DecodePoint, ...] = ()  # ascending batch
    max_batch: int | None = None  # the most sequences the worker runs at once (its scheduler's cap)
    kv_load: KVLoadCost | None = None  # None: the worker has no tier below the device

    @property
    def measured(self) -> bool:
        return self.prefill_tokens_per_s is not None or bool(self.decode)

    def to_json(self) -> dict:
        return {
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode": [{"batch": p.batch, "step_s": p.step_s, "steps": p.steps} for p in self.decode],
            "max_batch": self.max_batch,
            "kv_load": None if self.kv_load is None else asdict(self.kv_load),
        }

    @classmethod
    def from_json(cls, data: object) -> LoadProfile | None:
        """The profile a worker reported, or None when it is not one (workers are not trusted)."""
        if not isinstance(data, dict):
            return None
        prefill = data.get("prefill_tokens_per_s")
        decode = data.get("decode", [])
        max_batch = data.get("max_batch")
        kv_load = data.get("kv_load")
        if kv_load is not None and (kv_load := KVLoadCost.from_json(kv_load)) is None:
            return None
        if prefill is not None and not _positive(prefill):
            return None
        if max_batch is not None and not (_is_int(max_batch) and max_batch > 0):
            return None
        if not isinstance(decode, list) or len(decode) > MAX_DECODE_POINTS:
            return None
        points = []
        for item in decode:
            if not isinstance(item, dict):
                return None
            batch, step_s, steps = item.get("batch"), item.get("step_s"), item.get("steps", 1)
            if not (_positive(batch) and _positive(step_s) and _is_int(steps) and steps >= 0):
                return None
            points.append(DecodePoint(float(batch), float(step_s), steps))
        points.sort(key=lambda p: p.batch)
        return cls(None if prefill is None else float(prefill), tuple(points), max_batch, kv_load)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value: object) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )
