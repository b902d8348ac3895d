"""Index mutations as data: what the index log (in-process or a Redis Stream) carries between replicas.

Every op is an assignment to holder bits (worker, block, tier) -> held/not held; replaying a log in order
therefore yields the same match results on every replica, and re-applying an op a replica already applied
optimistically is harmless as long as the replay is in log order. Approximate expiries are absolute wall
times, and a re-insert keeps the later one, so they commute too.

Wire format (msgpack array, version 1): ``[kind, worker, ...]`` with kind one of
``"S"`` stored ``[.., parent | None, hashes, tier]``, ``"R"`` removed ``[.., hashes, tier]``,
``"C"`` cleared ``[..]``, ``"G"`` worker gone ``[..]``, ``"A"`` approximate ``[.., parent | None, hashes,
expires_at]``. ``tier`` is ``cache.wire.tiers.Tier``'s value (0 device, 1 host, 2 disk; a replica from
before the disk tier refuses 2, but it never reads this log: the Redis keys name the snapshot version).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeAlias

import msgpack

from cache.index.radix_index import RadixIndex
from cache.wire.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from cache.wire.tiers import Tier, tier_from_medium


@dataclass(frozen=True, slots=True)
class StoredOp:
    worker: str
    parent_hash: int | None
    hashes: list[int]
    tier: Tier = Tier.DEVICE


@dataclass(frozen=True, slots=True)
class RemovedOp:
    worker: str
    hashes: list[int]
    tier: Tier = Tier.DEVICE


@dataclass(frozen=True, slots=True)
class ClearedOp:
    worker: str


@dataclass(frozen=True, slots=True)
class WorkerGoneOp:
    worker: str


@dataclass(frozen=True, slots=True)
class ApproxOp:
    worker: str
    parent_hash: int | None
    hashes: list[int]
    expires_at: float


IndexOp: TypeAlias = StoredOp | RemovedOp | ClearedOp | WorkerGoneOp | ApproxOp


def apply_op(index: RadixIndex, op: IndexOp) -> None:
    if isinstance(op, StoredOp):
        index.stored(op.worker, op.parent_hash, op.hashes, op.tier)
    elif isinstance(op, RemovedOp):
        index.removed(op.worker, op.hashes, op.tier)
    elif isinstance(op, ClearedOp):
        index.cleared(op.worker)
    elif isinstance(op, WorkerGoneOp):
        index.remove_worker(op.worker)
    elif isinstance(op, ApproxOp):
        index.insert_approximate(op.worker, op.parent_hash, op.hashes, op.expires_at)
    else:
        raise TypeError(f"not an index op: {op!r}")


def ops_from_event(worker: str, event: KVEvent) -> IndexOp:
    """A worker's KV event -> the index op it implies."""
    if isinstance(event, BlockStored):
        return StoredOp(worker, event.parent_block_hash, event.block_hashes, tier_from_medium(event.medium))
    if isinstance(event, BlockRemoved):
        return RemovedOp(worker, event.block_hashes, tier_from_medium(event.medium))
    if isinstance(event, AllBlocksCleared):
        return ClearedOp(worker)
    raise TypeError(f"not a KV event: {event!r}")


def encode_op(op: IndexOp) -> bytes:
    body: list[Any]
    if isinstance(op, StoredOp):
        body = ["S", op.worker, op.parent_hash, op.hashes, int(op.tier)]
    elif isinstance(op, RemovedOp):
        body = ["R", op.worker, op.hashes, int(op.tier)]
    elif isinstance(op, ClearedOp):
        body = ["C", op.worker]
    elif isinstance(op, WorkerGoneOp):
        body = ["G", op.worker]
    elif isinstance(op, ApproxOp):
        body = ["A", op.worker, op.parent_hash, op.hashes, op.expires_at]
    else:
        raise TypeError(f"not an index op: {op!r}")
    return msgpack.packb(body, use_bin_type=True)


def decode_op(data: bytes) -> IndexOp:
    """Inverse of ``encode_op``. Raises ValueError on anything else, including well-formed msgpack with
    the wrong types (the log is shared: one replica's bad entry must not break another's index, whose
    snapshot packs every hash as a u64)."""
    try:
        body = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several types (ExtraData, FormatError, StackError, ...)
        raise ValueError(f"index op is not msgpack: {exc}") from None
    if not isinstance(body, list) or not body:
        raise ValueError("index op must be a non-empty array")
    kind, rest = body[0], body[1:]
    try:
        if kind == "S":
            return StoredOp(_worker(rest[0]), _parent(rest[1]), _hashes(rest[2]), Tier(rest[3]))
        if kind == "R":
            return RemovedOp(_worker(rest[0]), _hashes(rest[1]), Tier(rest[2]))
        if kind == "C":
            return ClearedOp(_worker(rest[0]))
        if kind == "G":
            return WorkerGoneOp(_worker(rest[0]))
        if kind == "A":
            return ApproxOp(_worker(rest[0]), _parent(rest[1]), _hashes(rest[2]), _expiry(rest[3]))
    except (IndexError, TypeError) as exc:
        raise ValueError(f"malformed index op {kind!r}: {exc}") from exc
    raise ValueError(f"unknown index op kind {kind!r}")


MAX_WORKER_ID_CHARS = 2048


def is_block_hash(value: Any) -> bool:
    """A u64, as ``cache.wire.hashing`` makes them (bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64


def _worker(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_WORKER_ID_CHARS:
        raise ValueError(f"worker must be a non-empty string, got {type(value).__name__}")
    return value


def _parent(value: Any) -> int | None:
    if value is not None and not is_block_hash(value):
        raise ValueError("parent hash must be a u64 or nil")
    return value


def _hashes(value: Any) -> list[int]:
    if not isinstance(value, list) or not all(is_block_hash(h) for h in value):
        raise ValueError("block hashes must be an array of u64")
    return value


def _expiry(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("expiry must be a finite number")
    return float(value)
