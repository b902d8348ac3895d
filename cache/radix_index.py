"""RadixIndex: which worker holds which prefix of blocks, and in which tier.

Representation: chained block hashes already encode their whole prefix (see ``cache.hashing``), so the
radix tree is a flat ``OrderedDict[hash -> _Node]`` plus parent links. The dict gives O(1) lookup per block;
the parent links and child counts exist only so that eviction removes leaves first and never orphans a
subtree. Holders of a block are two bitmasks over small per-index worker slots (bit s = worker slot s), one
for the device tier and one for the host tier: a few bytes per block instead of a dict per block.

Invariants:
* ``node.children`` == number of nodes whose ``parent`` is ``node``; the parent links form a forest.
* A node with no holders and no children is garbage and is deleted at once (cascading up to its parent).
* LRU order: every mutation that stores a chain (``stored``, ``insert_approximate``) moves its blocks to the
  MRU end deepest-first, so ancestors are normally fresher than descendants and the LRU end holds leaves;
  eviction gives non-leaves a second chance.
* ``match`` is a pure query: it never reorders or changes anything (expired approximate entries aside).
  Recency comes from the log instead: the gateway claims a request's prefix for its worker as soon as it
  routes it, and the worker's KV events store it again, so a routed prefix is refreshed anyway. Keeping
  queries out of the LRU order also keeps it a function of the replicated log, not of which replica
  answered which query, and saves a scattered write per matched block on the routing hot path.
* Not thread-safe: owned by one asyncio loop (or one thread).
"""

from __future__ import annotations

import contextlib
import heapq
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, repeat
from operator import and_, attrgetter, invert, or_

from cache.tiers import Tier


@dataclass(frozen=True)
class RadixIndexConfig:
    max_blocks: int = 2_000_000  # distinct blocks kept; beyond this, LRU leaves are evicted
    approx_ttl_s: float = 120.0  # lifetime of approximate (routed, not reported) entries


@dataclass(frozen=True, slots=True)
class MatchResult:
    """One worker's hold on a query: ``blocks`` leading blocks contiguous from the root, split by tier.

    A block held in both tiers counts as device. ``blocks == device_blocks + host_blocks``.
    """

    blocks: int
    device_blocks: int
    host_blocks: int

    @property
    def tier(self) -> Tier:
        """The slowest tier needed to reuse the matched prefix."""
        return Tier.HOST if self.host_blocks else Tier.DEVICE


@dataclass(frozen=True)
class IndexStats:
    blocks: int
    evictions: int
    approx_entries: int
    per_worker: dict[str, tuple[int, int]]  # worker -> (device blocks, host blocks)


class _Node:
    __slots__ = ("children", "device", "host", "key", "parent")

    def __init__(self, key: int, parent: _Node | None) -> None:
        self.key = key
        self.parent = parent
        self.device = 0  # bitmask of worker slots holding this block on the device
        self.host = 0  # bitmask of worker slots holding this block in host memory
        self.children = 0


_device_of = attrgetter("device")
_host_of = attrgetter("host")


def _bits(mask: int) -> Iterator[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class RadixIndex:
    def __init__(
        self, config: RadixIndexConfig | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config or RadixIndexConfig()
        self._clock = clock  # wall clock: approximate expiries are absolute so replicas agree on them
        self._nodes: OrderedDict[int, _Node] = OrderedDict()
        self._slot_of: dict[str, int] = {}
        self._names: list[str | None] = []  # slot -> worker id; None = free slot
        self._device_count: list[int] = []
        self._host_count: list[int] = []
        self._approx_expiry: dict[tuple[int, int], float] = {}  # (slot, hash) -> expires_at
        self._approx_heap: list[tuple[float, int, int]] = []  # (expires_at, slot, hash), lazily pruned
        self.evictions = 0

    # ---- queries -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._nodes)

    def workers(self) -> list[str]:
        return [name for name in self._names if name is not None]

    def match(self, hashes: Sequence[int]) -> dict[str, MatchResult]:
        """Per worker holding ``hashes[0]``: how many leading blocks it holds contiguously, by tier.

        Does not modify the index, not even its LRU order (expired approximate entries are dropped first).
        """
        if self._approx_heap and self._approx_heap[0][0] <= self._clock():
            self.expire()
        # Every per-block step below is a C-level map/accumulate/count (~10-40 ns per block); Python-level
        # work is per worker, not per block.
        nodes = list(map(self._nodes.get, hashes))
        with contextlib.suppress(ValueError):
            del nodes[nodes.index(None) :]
        if not nodes:
            return {}
        # held[i]: slots holding every block 0..i in some tier. As a set it only shrinks with i, so as an int
        # it never grows, and each distinct value is one contiguous run: a worker's match ends where its bit
        # leaves, found with one list.count per run instead of one Python step per block.
        held = list(accumulate(map(or_, map(_device_of, nodes), map(_host_of, nodes)), and_))
        ends: dict[int, int] = {}
        depth = 0
        while depth < len(held) and (mask := held[depth]):
            depth += held.count(mask)
            for slot in _bits(mask & ~(held[depth] if depth < len(held) else 0)):
                ends[slot] = depth
        if not ends:
            return {}
        del nodes[depth:]
        host_only = self._host_only_counts(nodes, ends)
        names = self._names
        out: dict[str, MatchResult] = {}
        for slot, n in ends.items():
            on_host = host_only.get(slot, 0)
            out[names[slot]] = MatchResult(n, n - on_host, on_host)  # type: ignore[index]
        return out

    def _host_only_counts(self, nodes: list[_Node], ends: dict[int, int]) -> dict[int, int]:
        """Per slot in ``ends``: how many of its first ``ends[slot]`` blocks it holds on the host only."""
        counts: dict[int, int] = {}
        if not any(self._host_count[slot] for slot in ends):
            return counts
        hosts = list(map(_host_of, nodes))
        if hosts.count(0) == len(hosts):
            return counts
        host_only = list(map(and_, hosts, map(invert, map(_device_of, nodes))))
        for slot, end in ends.items():
            if self._host_count[slot]:
                bit = 1 << slot
                # sum of (mask & bit) over the prefix = bit * (blocks with the bit set), all in C.
                if n := sum(map(and_, host_only[:end], repeat(bit))) >> slot:
                    counts[slot] = n
        return counts

    def holders(self, block_hash: int) -> dict[str, set[Tier]]:
        """Who holds one block, in which tiers (for tests and debugging)."""
        node = self._nodes.get(block_hash)
        out: dict[str, set[Tier]] = {}
        if node is None:
            return out
        for tier, mask in ((Tier.DEVICE, node.device), (Tier.HOST, node.host)):
            for slot in _bits(mask):
                out.setdefault(self._names[slot], set()).add(tier)  # type: ignore[arg-type]
        return out

    def stats(self) -> IndexStats:
        per_worker = {
            name: (self._device_count[slot], self._host_count[slot])
            for slot, name in enumerate(self._names)
            if name is not None
        }
        return IndexStats(len(self._nodes), self.evictions, len(self._approx_expiry), per_worker)

    # ---- mutations -----------------------------------------------------------------------------------
    def stored(
        self, worker: str, parent_hash: int | None, hashes: Sequence[int], tier: Tier = Tier.DEVICE
    ) -> None:
        """``worker`` now holds ``hashes`` (a chain continuing ``parent_hash``) in ``tier``."""
        slot = self._slot(worker)
        self._store(slot, parent_hash, hashes, tier)
        if self._approx_expiry and tier is Tier.DEVICE:
            for h in hashes:  # reported by the worker itself: no longer a guess that should expire
                self._approx_expiry.pop((slot, h), None)
        self._evict_over_capacity()

    def insert_approximate(
        self, worker: str, parent_hash: int | None, hashes: Sequence[int], expires_at: float | None = None
    ) -> None:
        """Guess that ``worker`` holds ``hashes`` on the device until ``expires_at`` (default now + TTL).

        For workers that publish no KV events: the gateway records what it routed. Re-inserting keeps
        the later expiry, so replicas applying the same inserts in any order agree.
        """
        if expires_at is None:
            expires_at = self._clock() + self.config.approx_ttl_s
        slot = self._slot(worker)
        self._store(slot, parent_hash, hashes, Tier.DEVICE)
        expiry = self._approx_expiry
        for h in hashes:
            key = (slot, h)
            if expiry.get(key, float("-inf")) < expires_at:
                expiry[key] = expires_at
                heapq.heappush(self._approx_heap, (expires_at, slot, h))
        self._evict_over_capacity()

    def removed(self, worker: str, hashes: Sequence[int], tier: Tier = Tier.DEVICE) -> None:
        """``worker`` no longer holds ``hashes`` in ``tier`` (other tiers and workers are untouched)."""
        slot = self._slot_of.get(worker)
        if slot is None:
            return
        for h in hashes:
            node = self._nodes.get(h)
            if node is not None:
                self._unset(node, slot, tier)
                if self._approx_expiry and tier is Tier.DEVICE:
                    self._approx_expiry.pop((slot, h), None)

    def cleared(self, worker: str) -> None:
        """``worker`` holds nothing any more (restart, cache flush, or stale event stream). O(blocks)."""
        slot = self._slot_of.get(worker)
        if slot is None:
            return
        if self._device_count[slot] or self._host_count[slot]:
            mask = 1 << slot
            garbage = []
            for node in self._nodes.values():
                if (node.device | node.host) & mask:
                    node.device &= ~mask
                    node.host &= ~mask
                    if not (node.device | node.host or node.children):
                        garbage.append(node)
            for node in garbage:
                self._drop_if_garbage(node)
            self._device_count[slot] = self._host_count[slot] = 0
        if self._approx_expiry:
            for key in [k for k in self._approx_expiry if k[0] == slot]:
                del self._approx_expiry[key]

    def remove_worker(self, worker: str) -> None:
        """Forget ``worker`` entirely and free its slot for reuse."""
        slot = self._slot_of.get(worker)
        if slot is None:
            return
        self.cleared(worker)
        del self._slot_of[worker]
        self._names[slot] = None

    def expire(self, now: float | None = None) -> int:
        """Drop approximate entries whose expiry has passed; returns how many were dropped."""
        now = self._clock() if now is None else now
        heap, expiry, dropped = self._approx_heap, self._approx_expiry, 0
        while heap and heap[0][0] <= now:
            expires_at, slot, h = heapq.heappop(heap)
            if expiry.get((slot, h)) != expires_at:
                continue  # superseded by a later insert, or confirmed/removed since
            del expiry[(slot, h)]
            node = self._nodes.get(h)
            if node is not None:
                self._unset(node, slot, Tier.DEVICE)
            dropped += 1
        return dropped

    # ---- internals -----------------------------------------------------------------------------------
    def _slot(self, worker: str) -> int:
        slot = self._slot_of.get(worker)
        if slot is not None:
            return slot
        try:
            slot = self._names.index(None)  # reuse: small slots keep masks small (cached) ints
            self._names[slot] = worker
        except ValueError:
            slot = len(self._names)
            self._names.append(worker)
            self._device_count.append(0)
            self._host_count.append(0)
        self._slot_of[worker] = slot
        return slot

    def _store(self, slot: int, parent_hash: int | None, hashes: Sequence[int], tier: Tier) -> None:
        bit = 1 << slot
        nodes = self._nodes
        parent = nodes.get(parent_hash) if parent_hash is not None else None
        counts = self._device_count if tier is Tier.DEVICE else self._host_count
        for h in hashes:
            node = nodes.get(h)
            if node is None:
                node = nodes[h] = _Node(h, parent)
                if parent is not None:
                    parent.children += 1
            if tier is Tier.DEVICE:
                if not node.device & bit:
                    node.device |= bit
                    counts[slot] += 1
            elif not node.host & bit:
                node.host |= bit
                counts[slot] += 1
            parent = node
        touch = nodes.move_to_end
        for h in reversed(hashes):  # deepest first: ancestors end up fresher than descendants
            touch(h)

    def _unset(self, node: _Node, slot: int, tier: Tier) -> None:
        bit = 1 << slot
        if tier is Tier.DEVICE:
            if node.device & bit:
                node.device &= ~bit
                self._device_count[slot] -= 1
        elif node.host & bit:
            node.host &= ~bit
            self._host_count[slot] -= 1
        self._drop_if_garbage(node)

    def _drop_if_garbage(self, node: _Node | None) -> None:
        nodes = self._nodes
        while node is not None and not (node.device | node.host or node.children):
            if nodes.get(node.key) is not node:
                return
            del nodes[node.key]
            parent, node.parent = node.parent, None
            if parent is not None:
                parent.children -= 1
            node = parent

    def _evict_over_capacity(self) -> None:
        nodes = self._nodes
        while len(nodes) > self.config.max_blocks:
            key, node = nodes.popitem(last=False)
            if node.children:  # not a leaf: second chance, so subtrees are never orphaned
                nodes[key] = node
                continue
            for slot in _bits(node.device):
                self._device_count[slot] -= 1
            for slot in _bits(node.host):
                self._host_count[slot] -= 1
            node.device = node.host = 0
            parent, node.parent = node.parent, None
            self.evictions += 1
            if parent is not None:
                parent.children -= 1
                self._drop_if_garbage(parent)
