"""RadixIndex: which worker holds which prefix of blocks, and in which tier.

Representation: chained block hashes already encode their whole prefix (see ``cache.wire.hashing``), so hash
``h_i`` *is* the radix-tree node for blocks ``0..i`` and the tree needs no explicit edges: it is one flat
``OrderedDict[hash -> holders]``. ``holders`` is one int packing three bitmasks over small per-index worker
slots (bit s = worker slot s; ``shift`` >= the number of slots), laid out for ``match``::

    holders = held | host_only << shift | both << 2 * shift
    held = device | host,  host_only = host & ~device,  both = device & host

so the prefix-AND of ``holders`` along a query carries, in its low ``shift`` bits, who holds every block so
far, and each block's ``host_only`` bits count the blocks a worker would have to copy back from the host.

Why this shape: on a gateway the index is read once per request for the whole prompt (hundreds of blocks),
and at a million blocks every lookup is a cache miss. A flat dict of ints costs one lookup per block and no
pointer chase to a node object, and the holders ints are interned, so the few hundred distinct values stay in
cache. ``match`` then runs each per-block step as a C-level ``map``/``accumulate``/``count``.

Invariants:
* No entry has holders 0: a block nobody holds is deleted at once.
* ``_device_count[s]`` / ``_host_count[s]`` == the number of entries with slot s's device / host bit.
* LRU order: every mutation that stores a chain (``stored``, ``insert_approximate``) moves its blocks to the
  MRU end deepest-first, so a chain's ancestors are fresher than its descendants and eviction (plain LRU,
  from the front) takes leaves first. A descendant stored later than its ancestors (a continuation event) can
  outlive them; it is then unreachable by ``match`` and ages out.
* ``match`` is a pure query: it never reorders or changes anything (expired approximate entries aside).
  Recency comes from the log instead: the gateway claims a request's prefix for its worker as soon as it
  routes it, and the worker's KV events store it again, so a routed prefix is refreshed anyway. Keeping
  queries out of the LRU order also keeps it a function of the replicated log, not of which replica
  answered which query.
* Not thread-safe: owned by one asyncio loop (or one thread).
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, repeat
from operator import and_

from cache.wire.tiers import Tier


@dataclass(frozen=True)
class RadixIndexConfig:
    max_blocks: int = 2_000_000  # distinct blocks kept; beyond this, LRU blocks are evicted
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


def _bits(mask: int) -> Iterator[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


_MEMO_LIMIT = 1 << 16  # distinct holders values interned before the table starts over


class RadixIndex:
    def __init__(
        self, config: RadixIndexConfig | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config or RadixIndexConfig()
        self._clock = clock  # wall clock: approximate expiries are absolute so replicas agree on them
        self._blocks: OrderedDict[int, int] = OrderedDict()  # hash -> holders, LRU -> MRU
        self._shift = 64  # grows (re-encoding every block) past 64 worker slots
        self._interned: dict[int, int] = {}
        self._slot_of: dict[str, int] = {}
        self._names: list[str | None] = []  # slot -> worker id; None = free slot
        self._device_count: list[int] = []
        self._host_count: list[int] = []
        self._approx_expiry: dict[tuple[int, int], float] = {}  # (slot, hash) -> expires_at
        self._approx_heap: list[tuple[float, int, int]] = []  # (expires_at, slot, hash), lazily pruned
        self.evictions = 0

    # ---- queries -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._blocks)

    def workers(self) -> list[str]:
        return [name for name in self._names if name is not None]

    def match(self, hashes: Sequence[int]) -> dict[str, MatchResult]:
        """Per worker holding ``hashes[0]``: how many leading blocks it holds contiguously, by tier.

        Does not modify the index, not even its LRU order (expired approximate entries are dropped first).
        """
        if self._approx_heap and self._approx_heap[0][0] <= self._clock():
            self.expire()
        if not hashes or hashes[0] not in self._blocks:
            return {}  # the common miss: a prompt nobody has seen
        holders = list(map(self._blocks.get, hashes, repeat(0)))  # 0 = nobody
        # prefix[i]: bits set in the holders of every block 0..i. As a set it only shrinks with i, so as an int
        # it never grows, and each distinct value is one contiguous run: a worker's match ends where its
        # held bit leaves, found with one list.count per run instead of one Python step per block. A missing
        # block makes the prefix 0 from there on, which ends every run.
        prefix = list(accumulate(holders, and_))
        low, n = (1 << self._shift) - 1, len(prefix)
        ends: dict[int, int] = {}
        depth = 0
        while depth < n and (held := prefix[depth] & low):
            depth += prefix.count(prefix[depth])
            for slot in _bits(held & ~(prefix[depth] & low if depth < n else 0)):
                ends[slot] = depth
        on_host = self._host_only_counts(holders[:depth], ends)
        names = self._names
        out: dict[str, MatchResult] = {}
        for slot, end in ends.items():
            host = on_host.get(slot, 0)
            out[names[slot]] = MatchResult(end, end - host, host)  # type: ignore[index]
        return out

    def _host_only_counts(self, holders: list[int], ends: dict[int, int]) -> dict[int, int]:
        """Per slot in ``ends``: how many of its first ``ends[slot]`` blocks it holds on the host only.

        Interned holders take few distinct values along one query, so this counts occurrences of each
        value (C-level list.count) rather than testing bits block by block.
        """
        counts: dict[int, int] = {}
        if not any(self._host_count[slot] for slot in ends):
            return counts
        shift = self._shift
        low = (1 << shift) - 1
        with_host_only = [v for v in set(holders) if v >> shift & low]
        for slot, end in ends.items():
            bit = 1 << (shift + slot)
            if values := [v for v in with_host_only if v & bit]:
                prefix = holders[:end]
                counts[slot] = sum(map(prefix.count, values))
        return counts

    def holders(self, block_hash: int) -> dict[str, set[Tier]]:
        """Who holds one block, in which tiers (for tests and debugging)."""
        device, host = self._decode(self._blocks.get(block_hash, 0))
        out: dict[str, set[Tier]] = {}
        for tier, mask in ((Tier.DEVICE, device), (Tier.HOST, host)):
            for slot in _bits(mask):
                out.setdefault(self._names[slot], set()).add(tier)  # type: ignore[arg-type]
        return out

    def tier_masks(self) -> Iterator[tuple[int, int, int]]:
        """``(hash, device mask, host mask)`` for every block, LRU first (for tests and debugging)."""
        decode = self._decode
        for h, holders in self._blocks.items():
            yield h, *decode(holders)

    def stats(self) -> IndexStats:
        per_worker = {
            name: (self._device_count[slot], self._host_count[slot])
            for slot, name in enumerate(self._names)
            if name is not None
        }
        return IndexStats(len(self._blocks), self.evictions, len(self._approx_expiry), per_worker)

    # ---- mutations -----------------------------------------------------------------------------------
    def stored(
        self, worker: str, parent_hash: int | None, hashes: Sequence[int], tier: Tier = Tier.DEVICE
    ) -> None:
        """``worker`` now holds ``hashes`` (a chain continuing ``parent_hash``) in ``tier``.

        ``parent_hash`` is accepted as KV events carry it; chained hashes already encode the parent.
        """
        slot = self._slot(worker)
        self._store(slot, hashes, tier)
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
        self._store(slot, hashes, Tier.DEVICE)
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
            self._unset(slot, h, tier)
            if self._approx_expiry and tier is Tier.DEVICE:
                self._approx_expiry.pop((slot, h), None)

    def cleared(self, worker: str) -> None:
        """``worker`` holds nothing any more (restart, cache flush, or stale event stream). O(blocks)."""
        slot = self._slot_of.get(worker)
        if slot is None:
            return
        if self._device_count[slot] or self._host_count[slot]:
            bit, blocks = 1 << slot, self._blocks
            # Holders take few distinct values: work out each one's replacement once (0 = nobody left),
            # then the per-block work is one dict probe and one store. dict.values/items walk the table
            # in memory order; OrderedDict's own iterators chase its LRU links (about 20x slower here).
            remap: dict[int, int] = {}
            for holders in set(dict.values(blocks)):
                if holders & bit:  # the held bit: any tier
                    device, host = self._decode(holders)
                    remap[holders] = self._encode(device & ~bit, host & ~bit) if (device | host) & ~bit else 0
            for h, holders in [item for item in dict.items(blocks) if item[1] & bit]:
                if rest := remap[holders]:
                    blocks[h] = rest  # keeps the LRU position
                else:
                    del blocks[h]
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
            self._unset(slot, h, Tier.DEVICE)
            dropped += 1
        return dropped

    # ---- internals -----------------------------------------------------------------------------------
    def _encode(self, device: int, host: int) -> int:
        """The holders int for these tier masks, interned: one shared object per distinct value, so
        match's reads of them stay in cache."""
        shift = self._shift
        holders = (device | host) | (host & ~device) << shift | (device & host) << 2 * shift
        interned = self._interned
        if len(interned) >= _MEMO_LIMIT:
            interned.clear()
        return interned.setdefault(holders, holders)

    def _decode(self, holders: int) -> tuple[int, int]:
        """``(device, host)`` masks of a holders int."""
        shift = self._shift
        low = (1 << shift) - 1
        held, host_only, both = holders & low, holders >> shift & low, holders >> 2 * shift
        return held & ~host_only, host_only | both

    def _slot(self, worker: str) -> int:
        slot = self._slot_of.get(worker)
        if slot is not None:
            return slot
        try:
            slot = self._names.index(None)  # reuse: small slots keep masks small
            self._names[slot] = worker
        except ValueError:
            slot = len(self._names)
            if slot >= self._shift:
                self._widen(2 * self._shift)
            self._names.append(worker)
            self._device_count.append(0)
            self._host_count.append(0)
        self._slot_of[worker] = slot
        return slot

    def _widen(self, shift: int) -> None:
        """Re-encode every holders value with a larger ``shift`` (when worker slots outgrow it). O(blocks)."""
        blocks, decode = self._blocks, self._decode
        masks = [(h, *decode(holders)) for h, holders in blocks.items()]
        self._shift, self._interned = shift, {}
        for h, device, host in masks:
            blocks[h] = self._encode(device, host)

    def _store(self, slot: int, hashes: Sequence[int], tier: Tier) -> None:
        # Every routed request stores its whole prompt (the routing claim), mostly blocks the worker already
        # holds, so whether the tier bit is set is read off the encoded holders without decoding them:
        # device <=> held and not host-only; host <=> host-only or both.
        bit, shift, on_device = 1 << slot, self._shift, tier is Tier.DEVICE
        blocks, get, decode, encode = self._blocks, self._blocks.get, self._decode, self._encode
        added = 0
        for h in hashes:
            holders = get(h, 0)
            if on_device:
                if holders & (bit | bit << shift) == bit:
                    continue
                device, host = decode(holders)
                device |= bit
            else:
                if holders & (bit << shift | bit << 2 * shift):
                    continue
                device, host = decode(holders)
                host |= bit
            blocks[h] = encode(device, host)
            added += 1
        self._tier_counts(tier)[slot] += added
        # Deepest first: ancestors end up fresher than descendants. deque(maxlen=0) runs the map in C.
        deque(map(blocks.move_to_end, reversed(hashes)), maxlen=0)

    def _unset(self, slot: int, block_hash: int, tier: Tier) -> None:
        bit = 1 << slot
        device, host = self._decode(self._blocks.get(block_hash, 0))
        if not (device if tier is Tier.DEVICE else host) & bit:
            return
        if tier is Tier.DEVICE:
            device &= ~bit
        else:
            host &= ~bit
        if device or host:
            self._blocks[block_hash] = self._encode(device, host)
        else:
            del self._blocks[block_hash]
        self._tier_counts(tier)[slot] -= 1

    def _tier_counts(self, tier: Tier) -> list[int]:
        return self._device_count if tier is Tier.DEVICE else self._host_count

    def _evict_over_capacity(self) -> None:
        blocks = self._blocks
        while len(blocks) > self.config.max_blocks:
            device, host = self._decode(blocks.popitem(last=False)[1])
            for slot in _bits(device):
                self._device_count[slot] -= 1
            for slot in _bits(host):
                self._host_count[slot] -= 1
            self.evictions += 1
