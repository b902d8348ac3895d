"""Serialise a RadixIndex to msgpack bytes and back (the Redis snapshot; a friend module of radix_index).

Format (msgpack map, version 1)::

    {"v": 1, "workers": [name | None, ...],              # index = slot in the masks below
     "blocks": [[hash, parent_hash | None, device_mask, host_mask], ...],   # LRU -> MRU order
     "approx": [[slot, hash, expires_at], ...]}

Parent links are stored by hash, so loading needs two passes (a parent may come after its child in LRU
order). Loading into a fresh index reproduces match results exactly; LRU order is kept.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Any

import msgpack

from cache.radix_index import RadixIndex, RadixIndexConfig, _bits, _Node

SNAPSHOT_VERSION = 1


def dump_index(index: RadixIndex) -> bytes:
    """Snapshot ``index`` (expired approximate entries are dropped first)."""
    index.expire()
    blocks = [
        [key, node.parent.key if node.parent is not None else None, node.device, node.host]
        for key, node in index._nodes.items()
    ]
    approx = [[slot, h, exp] for (slot, h), exp in index._approx_expiry.items()]
    state: dict[str, Any] = {
        "v": SNAPSHOT_VERSION,
        "workers": index._names,
        "blocks": blocks,
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
    index._device_count = [0] * len(names)
    index._host_count = [0] * len(names)
    nodes = index._nodes
    parents: list[tuple[_Node, int | None]] = []
    for key, parent_key, device, host in state["blocks"]:
        node = nodes[key] = _Node(key, None)
        node.device, node.host = device, host
        parents.append((node, parent_key))
        for slot in _bits(device):
            index._device_count[slot] += 1
        for slot in _bits(host):
            index._host_count[slot] += 1
    for node, parent_key in parents:
        parent = nodes.get(parent_key) if parent_key is not None else None
        if parent is not None:
            node.parent = parent
            parent.children += 1
    for slot, h, expires_at in state["approx"]:
        index._approx_expiry[(slot, h)] = expires_at
        index._approx_heap.append((expires_at, slot, h))
    heapq.heapify(index._approx_heap)
    return index
