"""Serialise a RadixIndex to msgpack bytes and back (the Redis snapshot; a friend module of radix_index).

Format (msgpack map, version 3)::

    {"v": 3, "workers": [name | None, ...],             # index = slot in the masks below
     "values": [[device, host, disk], ...],             # the distinct holder sets (masks); one past 64 bits
                                                        # is little-endian bytes (msgpack ints stop there)
     "hashes": bytes,                                   # u64 little-endian per block, LRU -> MRU order
     "value_ids": bytes,                                # u32 little-endian per block: index into values
     "approx": [[slot, hash, expires_at], ...]}

Blocks are columns of packed ints rather than one msgpack array per block, and holders are stored once per
distinct value (a few hundred at a million blocks): a snapshot is written on a replica's event loop, so its
cost is a routing stall. Block hashes are u64, as ``cache.wire.hashing`` and ``cache.wire.events`` produce them.

Version 2 is version 3 without the disk mask (the index kept disk holders as host then); it still loads,
with no disk holders. Version 1 carried ``[hash, parent, device, host]`` per block, for an explicit tree
the index no longer keeps. Loading into a fresh index reproduces match results exactly; LRU order is kept.
The Redis store's keys name ``SNAPSHOT_VERSION`` (``cache.index.redis_store``), so replicas of another
version never share a log or a snapshot with this one.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from cache.index.radix_index import RadixIndex, RadixIndexConfig, _bits

SNAPSHOT_VERSION = 3
_READABLE = (2, 3)


def _pack_mask(mask: int) -> int | bytes:
    return mask if mask < 1 << 64 else mask.to_bytes((mask.bit_length() + 7) // 8, "little")


def _unpack_mask(mask: int | bytes) -> int:
    return int.from_bytes(mask, "little") if isinstance(mask, bytes) else mask


def dump_index(index: RadixIndex) -> bytes:
    """Snapshot ``index`` (expired approximate entries are dropped first)."""
    index.expire()
    # Two walks of the LRU links (both in LRU order) beat one walk that builds a million (hash, holders)
    # tuples; the walk itself is most of a snapshot's cost.
    hashes, holders = list(index._blocks), list(index._blocks.values())
    value_id = {value: i for i, value in enumerate(set(holders))}
    values = [[_pack_mask(mask) for mask in index._decode(value)] for value in value_id]
    state: dict[str, Any] = {
        "v": SNAPSHOT_VERSION,
        "workers": index._names,
        "values": values,
        "hashes": np.array(hashes, dtype="<u8").tobytes(),
        "value_ids": np.array(list(map(value_id.__getitem__, holders)), dtype="<u4").tobytes(),
        "approx": [[slot, h, exp] for (slot, h), exp in index._approx_expiry.items()],
    }
    return msgpack.packb(state, use_bin_type=True)


def load_index(
    data: bytes, config: RadixIndexConfig | None = None, clock: Callable[[], float] = time.time
) -> RadixIndex:
    """Rebuild an index from ``dump_index`` bytes. Raises ValueError on an unknown version."""
    state = msgpack.unpackb(data, raw=False, strict_map_key=False)
    if state.get("v") not in _READABLE:
        raise ValueError(f"unsupported snapshot version {state.get('v')!r}")
    index = RadixIndex(config, clock)
    names: list[str | None] = list(state["workers"])
    index._names = names
    index._slot_of = {name: slot for slot, name in enumerate(names) if name is not None}
    index._counts = tuple([0] * len(names) for _ in index._counts)
    while index._shift < len(names):
        index._widen(2 * index._shift)
    masks = [tuple(map(_unpack_mask, value)) for value in state["values"]]
    if any(len(tiers) != (3 if state["v"] == 3 else 2) for tiers in masks):
        raise ValueError("snapshot holder sets do not have one mask per tier")
    table = [index._encode(*tiers) for tiers in masks]
    ids = np.frombuffer(state["value_ids"], dtype="<u4")
    hashes = np.frombuffer(state["hashes"], dtype="<u8")
    if len(ids) != len(hashes) or (len(ids) and int(ids.max()) >= len(table)):
        raise ValueError("snapshot columns do not agree")
    index._blocks.update(zip(hashes.tolist(), map(table.__getitem__, ids.tolist()), strict=True))
    for tiers, count in zip(masks, np.bincount(ids, minlength=len(masks)).tolist(), strict=True):
        for counts, mask in zip(index._counts, tiers, strict=False):  # v2: no disk mask
            for slot in _bits(mask):
                counts[slot] += count
    for slot, h, expires_at in state["approx"]:
        index._approx_expiry[(slot, h)] = expires_at
        index._approx_heap.append((expires_at, slot, h))
    heapq.heapify(index._approx_heap)
    return index
