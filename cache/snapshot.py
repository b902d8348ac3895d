"""Serialise a RadixIndex to msgpack bytes and back (the Redis snapshot; a friend module of radix_index).

Format (msgpack map, version 2)::

    {"v": 2, "workers": [name | None, ...],              # index = slot in the masks below
     "blocks": [[hash, device_mask, host_mask], ...],    # LRU -> MRU order; a mask past 64 bits is
                                                         # little-endian bytes (msgpack ints stop at 64)
     "approx": [[slot, hash, expires_at], ...]}

Version 1 also carried each block's parent hash, for the explicit tree the index no longer keeps. Loading
into a fresh index reproduces match results exactly; LRU order is kept.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Any

import msgpack

from cache.radix_index import RadixIndex, RadixIndexConfig, _bits

SNAPSHOT_VERSION = 2


def _pack_mask(mask: int) -> int | bytes:
    return mask if mask < 1 << 64 else mask.to_bytes((mask.bit_length() + 7) // 8, "little")


def _unpack_mask(mask: int | bytes) -> int:
    return int.from_bytes(mask, "little") if isinstance(mask, bytes) else mask


def dump_index(index: RadixIndex) -> bytes:
    """Snapshot ``index`` (expired approximate entries are dropped first)."""
    index.expire()
    approx = [[slot, h, exp] for (slot, h), exp in index._approx_expiry.items()]
    state: dict[str, Any] = {
        "v": SNAPSHOT_VERSION,
        "workers": index._names,
        "blocks": [[h, _pack_mask(device), _pack_mask(host)] for h, device, host in index.tier_masks()],
        "approx": approx,
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
    device_count, host_count = index._device_count, index._host_count
    while index._shift < len(names):
        index._widen(2 * index._shift)
    blocks = index._blocks
    for h, device, host in state["blocks"]:
        device, host = _unpack_mask(device), _unpack_mask(host)
        blocks[h] = index._encode(device, host)
        for slot in _bits(device):
            device_count[slot] += 1
        for slot in _bits(host):
            host_count[slot] += 1
    for slot, h, expires_at in state["approx"]:
        index._approx_expiry[(slot, h)] = expires_at
        index._approx_heap.append((expires_at, slot, h))
    heapq.heapify(index._approx_heap)
    return index
