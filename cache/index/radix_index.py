"""RadixIndex: which worker holds which prefix of blocks, and in which tier.

Representation: chained block hashes already encode their whole prefix (see ``cache.wire.hashing``), so hash
``h_i`` *is* the radix-tree node for blocks ``0..i`` and the tree needs no explicit edges: it is one flat
``OrderedDict[hash -> holders]``. ``holders`` is one int packing five bitmasks over small per-index worker
slots (bit s = worker slot s; ``shift`` >= the number of slots), laid out for ``match``::

    holders = held | host_only << shift | disk_only << 2 * shift | both << 3 * shift | disk_also << 4 * shift
    held = device | host | disk            (any tier)
    host_only = host & ~device             (its fastest copy is on the host)
    disk_only = disk & ~device & ~host     (its only copy is on disk)
    both = device & host,  disk_also = disk & (device | host)   (only to recover the three tier masks)

so the prefix-AND of ``holders`` along a query carries, in its low ``shift`` bits, who holds every block so
far, and each block's ``host_only`` / ``disk_only`` bits count the blocks a worker would have to load back
from the host / from disk. Every tier has its own bit: a removal from the device or the host never drops
a block the disk still holds (nor the reverse).

Why this shape: on a gateway the index is read once per request for the whole prompt (hundreds of blocks),
and at a million blocks every lookup is a cache miss. A flat dict of ints costs one lookup per block and no
pointer chase to a node object, and the holders ints are interned, so the few hundred distinct values stay in
cache. ``match`` then runs each per-block step as a C-level ``map``/``accumulate``/``count``.

Invariants:
* No entry has holders 0: a block nobody holds is deleted at once.
* ``_counts[tier][s]`` == the number of entries with slot s's bit in that tier.
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
from typing import NamedTuple

from cache.wire.tiers import Tier


@dataclass(frozen=True)
class RadixIndexConfig:
    max_blocks: int = 2_000_000  # distinct blocks kept; beyond this, LRU blocks are evicted
    approx_ttl_s: float = 120.0  # lifetime of approximate (routed, not reported) entries


@dataclass(frozen=True, slots=True)
class MatchResult:
    """One worker's hold on a query: ``blocks`` leading blocks contiguous from the root, split by the
    fastest tier holding each (device, else host, else disk). ``blocks == device + host + disk blocks``.
    """

    blocks: int
    device_blocks: int
    host_blocks: int
    disk_blocks: int = 0

    @property
    def tier(self) -> Tier:
        """The slowest tier needed to reuse the matched prefix."""
        return Tier.DISK if self.disk_blocks else Tier.HOST if self.host_blocks else Tier.DEVICE


class TierBlocks(NamedTuple):
    """Blocks one worker holds in each tier (a block in two tiers counts in both)."""

    device: int
    host: int
    disk: int = 0


@dataclass(frozen=True)
class IndexStats:
    blocks: int
    evictions: int
    approx_entries: int
    per_worker: dict[str, TierBlocks]


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
        self._counts: tuple[list[int], ...] = tuple([] for _ in Tier)  # tier -> slot -> blocks
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
        matched = holders[:depth]
        on_host = self._slow_counts(matched, ends, Tier.HOST)
        on_disk = self._slow_counts(matched, ends, Tier.DISK)
        names = self._names
        out: dict[str, MatchResult] = {}
        for slot, end in ends.items():
            host, disk = on_host.get(slot, 0), on_disk.get(slot, 0)
            out[names[slot]] = MatchResult(end, end - host - disk, host, disk)  # type: ignore[index]
        return out

    def _slow_counts(self, holders: list[int], ends: dict[int, int], tier: Tier) -> dict[int, int]:
        """Per slot in ``ends``: how many of its first ``ends[slot]`` blocks have ``tier`` (HOST: host
        only; DISK: disk only) as their fastest copy, read off the ``host_only`` / ``disk_only`` field.

        Interned holders take few distinct values along one query, so this counts occurrences of each
        value (C-level list.count) rather than testing bits block by block.
        """
        counts: dict[int, int] = {}
        tier_counts = self._counts[tier]
        if not any(tier_counts[slot] for slot in ends):
            return counts
        shift = self._shift
        field, low = tier * shift, (1 << shift) - 1  # host_only is field 1, disk_only field 2
        with_slow = [v for v in set(holders) if v >> field & low]
        for slot, end in ends.items():
            bit = 1 << (field + slot)
            if values := [v for v in with_slow if v & bit]:
                prefix = holders[:end]
                counts[slot] = sum(map(prefix.count, values))
        return counts

    def holders(self, block_hash: int) -> dict[str, set[Tier]]:
        """Who holds one block, in which tiers (for tests and debugging)."""
        out: dict[str, set[Tier]] = {}
        for tier, mask in zip(Tier, self._decode(self._blocks.get(block_hash, 0)), strict=True):
            for slot in _bits(mask):
                out.setdefault(self._names[slot], set()).add(tier)  # type: ignore[arg-type]
        return out

    def tier_masks(self) -> Iterator[tuple[int, int, int, int]]:
        """``(hash, device mask, host mask, disk mask)`` for every block, LRU first (for tests and debugging)."""
        decode = self._decode
        for h, holders in self._blocks.items():
            yield h, *decode(holders)

    def stats(self) -> IndexStats:
        per_worker = {
            name: TierBlocks(*(counts[slot] for counts in self._counts))
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
        if any(counts[slot] for counts in self._counts):
            bit, blocks = 1 << slot, self._blocks
            # Holders take few distinct values: work out each one's replacement once (0 = nobody left),
            # then the per-block work is one dict probe and one store. dict.values/items walk the table
            # in memory order; OrderedDict's own iterators chase its LRU links (about 20x slower here).
            remap: dict[int, int] = {}
            for holders in set(dict.values(blocks)):
                if holders & bit:  # the held bit: any tier
                    rest = [mask & ~bit for mask in self._decode(holders)]
                    remap[holders] = self._encode(*rest) if any(rest) else 0
            for h, holders in [item for item in dict.items(blocks) if item[1] & bit]:
                if rest := remap[holders]:
                    blocks[h] = rest  # keeps the LRU position
                else:
                    del blocks[h]
            for counts in self._counts:
                counts[slot] = 0
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
    def _encode(self, device: int, host: int, disk: int = 0) -> int:
        """The holders int for these tier masks, interned: one shared object per distinct value, so
        match's reads of them stay in cache."""
        shift = self._shift
        holders = (
            (device | host | disk)
            | (host & ~device) << shift
            | (disk & ~(device | host)) << 2 * shift
            | (device & host) << 3 * shift
            | (disk & (device | host)) << 4 * shift
        )
        interned = self._interned
        if len(interned) >= _MEMO_LIMIT:
            interned.clear()
        return interned.setdefault(holders, holders)

    def _decode(self, holders: int) -> tuple[int, int, int]:
        """``(device, host, disk)`` masks of a holders int."""
        shift = self._shift
        low = (1 << shift) - 1
        held, host_only, disk_only = holders & low, holders >> shift & low, holders >> 2 * shift & low
        both, disk_also = holders >> 3 * shift & low, holders >> 4 * shift
        return held & ~host_only & ~disk_only, host_only | both, disk_only | disk_also

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
            for counts in self._counts:
                counts.append(0)
        self._slot_of[worker] = slot
        return slot

    def _widen(self, shift: int) -> None:
        """Re-encode every holders value with a larger ``shift`` (when worker slots outgrow it). O(blocks)."""
        blocks, decode = self._blocks, self._decode
        masks = [(h, decode(holders)) for h, holders in blocks.items()]
        self._shift, self._interned = shift, {}
        for h, tiers in masks:
            blocks[h] = self._encode(*tiers)

    def _store(self, slot: int, hashes: Sequence[int], tier: Tier) -> None:
        # Every routed request stores its whole prompt (the routing claim), mostly blocks the worker already
        # holds, so whether the tier bit is set is read off the encoded holders without decoding them:
        # device <=> held and neither host-only nor disk-only; host <=> host-only or both; disk <=>
        # disk-only or disk-also. A block the worker holds in no tier yet (a new prefix) is one OR away:
        # ``fresh`` is its bits once held in ``tier`` alone.
        bit, shift = 1 << slot, self._shift
        blocks, get, decode, encode = self._blocks, self._blocks.get, self._decode, self._encode
        if tier is Tier.DEVICE:
            probe, want, fresh = bit | bit << shift | bit << 2 * shift, bit, bit
        elif tier is Tier.HOST:
            probe, want, fresh = bit << shift | bit << 3 * shift, 0, bit | bit << shift
        else:
            probe, want, fresh = bit << 2 * shift | bit << 4 * shift, 0, bit | bit << 2 * shift
        if len(self._interned) >= _MEMO_LIMIT:
            self._interned.clear()
        intern = self._interned.setdefault
        added = 0
        for h in hashes:
            holders = get(h, 0)
            if want:
                if holders & probe == want:
                    continue
            elif holders & probe:
                continue
            if holders & bit:  # held in another tier: its other fields change too
                masks = list(decode(holders))
                masks[tier] |= bit
                blocks[h] = encode(*masks)
            else:
                new = holders | fresh
                blocks[h] = intern(new, new)
            added += 1
        self._counts[tier][slot] += added
        # Deepest first: ancestors end up fresher than descendants. deque(maxlen=0) runs the map in C.
        deque(map(blocks.move_to_end, reversed(hashes)), maxlen=0)

    def _unset(self, slot: int, block_hash: int, tier: Tier) -> None:
        bit = 1 << slot
        masks = list(self._decode(self._blocks.get(block_hash, 0)))
        if not masks[tier] & bit:
            return
        masks[tier] &= ~bit
        if any(masks):
            self._blocks[block_hash] = self._encode(*masks)
        else:
            del self._blocks[block_hash]
        self._counts[tier][slot] -= 1

    def _evict_over_capacity(self) -> None:
        blocks = self._blocks
        while len(blocks) > self.config.max_blocks:
            for counts, mask in zip(self._counts, self._decode(blocks.popitem(last=False)[1]), strict=True):
                for slot in _bits(mask):
                    counts[slot] -= 1
            self.evictions += 1
