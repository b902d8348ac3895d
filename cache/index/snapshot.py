"""Serialise a RadixIndex to msgpack bytes and back (the Redis snapshot; a friend module of radix_index).

Format (msgpack map, version 2)::

    {"v": 2, "workers": [name | None, ...],             # index = slot in the masks below
     "values": [[device_mask, host_mask], ...],         # the distinct holder sets; a mask past 64 bits
                                                        # is little-endian bytes (msgpack ints stop there)
     "hashes": bytes,                                   # u64 little-endian per block, LRU -> MRU order
     "value_ids": bytes,                                # u32 little-endian per block: index into values
     "approx": [[slot, hash, expires_at], ...]}

Blocks are columns of packed ints rather than one msgpack array per block, and holders are stored once per
distinct value (a few hundred at a million blocks): a snapshot is written on a replica's event loop, so its
cost is a routing stall. Block hashes are u64, as ``cache.wire.hashing`` and ``cache.wire.events`` produce them.

Version 1 carried ``[hash, parent, device, host]`` per block, for an explicit tree the index no longer
keeps. Loading into a fresh index reproduces match results exactly; LRU order is kept.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from cache.index.radix_index import RadixIndex, RadixIndexConfig, _bits

SNAPSHOT_VERSION = 2


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
    if state.get("v") != SNAPSHOT_VERSION:
        raise ValueError(f"unsupported snapshot version {state.get('v')!r}")
    index = RadixIndex(config, clock)
    names: list[str | None] = list(state["workers"])
    index._names = names
    index._slot_of = {name: slot for slot, name in enumerate(names) if name is not None}
    index._device_count, index._host_count = [0] * len(names), [0] * len(names)
    while index._shift < len(names):
        index._widen(2 * index._shift)
    masks = [(_unpack_mask(device), _unpack_mask(host)) for device, host in state["values"]]
    table = [index._encode(device, host) for device, host in masks]
    ids = np.frombuffer(state["value_ids"], dtype="<u4")
    hashes = np.frombuffer(state["hashes"], dtype="<u8")
    if len(ids) != len(hashes) or (len(ids) and int(ids.max()) >= len(table)):
        raise ValueError("snapshot columns do not agree")
    index._blocks.update(zip(hashes.tolist(), map(table.__getitem__, ids.tolist()), strict=True))
    for (device, host), count in zip(masks, np.bincount(ids, minlength=len(masks)).tolist(), strict=True):
        for slot in _bits(device):
            index._device_count[slot] += count
        for slot in _bits(host):
            index._host_count[slot] += count
    for slot, h, expires_at in state["approx"]:
        index._approx_expiry[(slot, h)] = expires_at
        index._approx_heap.append((expires_at, slot, h))
    heapq.heapify(index._approx_heap)
    return index
