"""A brute-force model of RadixIndex semantics, and an invariant checker, shared by the cache tests."""

from __future__ import annotations

from collections.abc import Sequence

from cache.index.radix_index import MatchResult, RadixIndex
from cache.wire.tiers import Tier


class BruteForceIndex:
    """worker -> {hash -> tiers held}; match walks the query for every worker. Obviously correct, slow."""

    def __init__(self) -> None:
        self.held: dict[str, dict[int, set[Tier]]] = {}
        self.approx: dict[tuple[str, int], float] = {}

    def stored(self, worker: str, parent: int | None, hashes: Sequence[int], tier: Tier) -> None:
        blocks = self.held.setdefault(worker, {})
        for h in hashes:
            blocks.setdefault(h, set()).add(tier)
            if tier is Tier.DEVICE:
                self.approx.pop((worker, h), None)

    def insert_approximate(
        self, worker: str, parent: int | None, hashes: Sequence[int], expires_at: float
    ) -> None:
        blocks = self.held.setdefault(worker, {})
        for h in hashes:
            blocks.setdefault(h, set()).add(Tier.DEVICE)
            self.approx[(worker, h)] = max(self.approx.get((worker, h), float("-inf")), expires_at)

    def removed(self, worker: str, hashes: Sequence[int], tier: Tier) -> None:
        for h in hashes:
            self.held.get(worker, {}).get(h, set()).discard(tier)
            if tier is Tier.DEVICE:
                self.approx.pop((worker, h), None)

    def cleared(self, worker: str) -> None:
        self.held.pop(worker, None)
        for key in [k for k in self.approx if k[0] == worker]:
            del self.approx[key]

    def expire(self, now: float) -> None:
        for (worker, h), expires_at in list(self.approx.items()):
            if expires_at <= now:
                self.held[worker][h].discard(Tier.DEVICE)
                del self.approx[(worker, h)]

    def match(self, hashes: Sequence[int]) -> dict[str, MatchResult]:
        out = {}
        for worker, blocks in self.held.items():
            n = host = disk = 0
            for h in hashes:
                tiers = blocks.get(h)
                if not tiers:
                    break
                n += 1
                fastest = min(tiers)
                host += fastest is Tier.HOST
                disk += fastest is Tier.DISK
            if n:
                out[worker] = MatchResult(n, n - host - disk, host, disk)
        return out


def check_invariants(index: RadixIndex) -> None:
    blocks = list(index.tier_masks())
    assert all(any(masks) for _, *masks in blocks), "a block nobody holds was kept"
    assert len(blocks) == len(index)
    stats = index.stats()
    for worker, counts in stats.per_worker.items():
        slot = index._slot_of[worker]
        for tier, count in zip(Tier, counts, strict=True):
            assert count == sum(1 for _, *masks in blocks if masks[tier] >> slot & 1), (worker, tier)
