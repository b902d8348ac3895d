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
            n = host = 0
            for h in hashes:
                tiers = blocks.get(h)
                if not tiers:
                    break
                n += 1
                host += Tier.DEVICE not in tiers
            if n:
                out[worker] = MatchResult(n, n - host, host)
        return out


def check_invariants(index: RadixIndex) -> None:
    blocks = list(index.tier_masks())
    assert all(device | host for _, device, host in blocks), "a block nobody holds was kept"
    assert len(blocks) == len(index)
    stats = index.stats()
    for worker, (device, host) in stats.per_worker.items():
        slot = index._slot_of[worker]
        assert device == sum(1 for _, d, _ in blocks if d >> slot & 1)
        assert host == sum(1 for _, _, h in blocks if h >> slot & 1)
