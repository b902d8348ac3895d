import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from cache.index.radix_index import MatchResult, RadixIndex, RadixIndexConfig, TierBlocks
from cache.index.snapshot import dump_index, load_index
from cache.wire.tiers import Tier
from tests.cache.index.index_model import BruteForceIndex, check_invariants


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_match_counts_leading_blocks_per_worker_and_tier() -> None:
    index = RadixIndex()
    index.stored("a", None, [1, 2, 3, 4])
    index.stored("b", None, [1, 2])
    index.stored("b", 2, [3], Tier.HOST)
    index.stored("c", None, [2, 3])  # holds blocks but not the first one: no usable prefix
    assert index.match([1, 2, 3, 4, 5]) == {"a": MatchResult(4, 4, 0), "b": MatchResult(3, 2, 1)}
    assert index.match([1, 2, 3])["b"].tier is Tier.HOST
    assert index.match([9, 1]) == {}
    assert index.match([]) == {}


def test_a_gap_ends_the_prefix() -> None:
    index = RadixIndex()
    index.stored("a", None, [1, 2, 3, 4])
    index.removed("a", [2])
    assert index.match([1, 2, 3, 4]) == {"a": MatchResult(1, 1, 0)}


def test_block_in_both_tiers_counts_as_device() -> None:
    index = RadixIndex()
    index.stored("a", None, [1, 2])
    index.stored("a", None, [1, 2], Tier.HOST)
    assert index.match([1, 2]) == {"a": MatchResult(2, 2, 0)}
    index.removed("a", [1, 2], Tier.DEVICE)  # offloaded copy survives eviction from the GPU
    assert index.match([1, 2]) == {"a": MatchResult(2, 0, 2)}


def test_cleared_and_worker_gone_affect_only_that_worker() -> None:
    index = RadixIndex()
    index.stored("a", None, [1, 2, 3])
    index.stored("b", None, [1, 2, 3])
    index.cleared("a")
    assert index.match([1, 2, 3]) == {"b": MatchResult(3, 3, 0)}
    index.remove_worker("b")
    assert index.match([1, 2, 3]) == {} and len(index) == 0 and index.workers() == ["a"]
    index.stored("c", None, [7])  # reuses b's slot without inheriting anything
    assert index.match([1]) == {} and index.match([7]) == {"c": MatchResult(1, 1, 0)}


def test_approximate_entries_expire_unless_confirmed() -> None:
    clock = FakeClock()
    index = RadixIndex(RadixIndexConfig(approx_ttl_s=10), clock)
    index.insert_approximate("a", None, [1, 2, 3])
    index.stored("a", None, [1])  # the worker reported block 1 itself
    clock.now += 5
    index.insert_approximate("a", None, [3])  # refreshed
    assert index.match([1, 2, 3]) == {"a": MatchResult(3, 3, 0)}
    clock.now += 6
    assert index.match([1, 2, 3]) == {"a": MatchResult(1, 1, 0)}
    assert index.holders(3) == {"a": {Tier.DEVICE}}
    clock.now += 5
    assert index.expire() == 1 and index.holders(3) == {}
    check_invariants(index)


def test_eviction_bounds_blocks_and_removes_leaves_first() -> None:
    index = RadixIndex(RadixIndexConfig(max_blocks=100))
    for chain in range(50):
        hashes = [chain * 1000 + i for i in range(10)]
        index.stored(f"w{chain % 3}", None, hashes)
        index.insert_approximate("w0", None, list(range(10)), float("inf"))  # routed again: keeps chain 0 hot
        assert len(index) <= 100
        check_invariants(index)
    assert index.evictions > 0
    assert index.match(list(range(10))) == {"w0": MatchResult(10, 10, 0)}
    recent = [49 * 1000 + i for i in range(10)]
    assert index.match(recent)["w1"].blocks == 10


def test_match_does_not_refresh_lru_order() -> None:
    # Queries are pure: only stores refresh recency, so a queried but never routed chain is evicted first.
    index = RadixIndex(RadixIndexConfig(max_blocks=4))
    index.stored("a", None, [1, 2])
    index.stored("b", None, [3, 4])
    assert index.match([1, 2]) == {"a": MatchResult(2, 2, 0)}
    index.stored("b", 4, [5, 6])
    assert index.match([1, 2]) == {} and index.match([3, 4, 5, 6]) == {"b": MatchResult(4, 4, 0)}
    check_invariants(index)


def test_stats_report_blocks_per_worker() -> None:
    index = RadixIndex()
    index.stored("a", None, [1, 2])
    index.stored("a", 2, [3], Tier.HOST)
    stats = index.stats()
    assert stats.blocks == 3 and stats.per_worker == {"a": (2, 1, 0)}
    index.stored("a", 2, [3], Tier.DISK)
    assert index.stats().per_worker["a"] == TierBlocks(device=2, host=1, disk=1)


def test_disk_holders_are_kept_apart_from_device_and_host() -> None:
    index = RadixIndex()
    index.stored("a", None, [1, 2, 3, 4])
    index.stored("a", None, [3, 4], Tier.HOST)
    index.stored("a", None, [1, 2, 3, 4], Tier.DISK)  # the disk tier holds every page it was given
    index.stored("b", None, [1, 2], Tier.DISK)  # a restarted engine announcing its page files
    assert index.match([1, 2, 3, 4]) == {"a": MatchResult(4, 4, 0, 0), "b": MatchResult(2, 0, 0, 2)}
    index.removed("a", [3, 4], Tier.DEVICE)  # demoted: the host copy is the fastest now
    assert index.match([1, 2, 3, 4])["a"] == MatchResult(4, 2, 2, 0)
    index.removed("a", [3, 4], Tier.HOST)  # host evicted: the disk still holds them
    assert index.match([1, 2, 3, 4])["a"] == MatchResult(4, 2, 0, 2)
    assert index.match([1, 2, 3, 4])["a"].tier is Tier.DISK
    index.removed("a", [1, 2, 3, 4], Tier.DEVICE)
    assert index.match([1, 2, 3, 4])["a"] == MatchResult(4, 0, 0, 4)
    assert index.holders(3) == {"a": {Tier.DISK}}
    index.removed("a", [3], Tier.DISK)  # gone from its last tier: now a gap
    assert index.match([1, 2, 3, 4])["a"] == MatchResult(2, 0, 0, 2)
    index.stored("a", None, [3], Tier.HOST)
    index.removed("a", [1], Tier.DISK)  # a removal from disk leaves the host copy of another block alone
    assert index.holders(3) == {"a": {Tier.HOST}} and index.holders(1) == {"b": {Tier.DISK}}
    check_invariants(index)


def test_cleared_drops_every_tier_of_one_worker_only() -> None:
    index = RadixIndex()
    for worker in ("a", "b"):
        index.stored(worker, None, [1, 2])
        index.stored(worker, None, [1, 2], Tier.HOST)
        index.stored(worker, None, [1, 2, 3], Tier.DISK)
    index.cleared("a")
    assert index.match([1, 2, 3]) == {"b": MatchResult(3, 2, 0, 1)}
    assert index.stats().per_worker["a"] == (0, 0, 0)
    check_invariants(index)


def test_more_workers_than_one_mask_word_agree_with_model() -> None:
    # Slots past 64 re-encode every block's holders (five masks, ``shift`` bits each) with a wider shift.
    rng = random.Random(7)
    index, model = RadixIndex(clock=lambda: 0.0), BruteForceIndex()
    for step in range(3000):
        worker, tier = f"w{rng.randrange(80)}", rng.choice(list(Tier))
        hashes = [rng.randrange(1, 20) for _ in range(rng.randint(1, 5))]
        if rng.random() < 0.7:
            index.stored(worker, None, hashes, tier)
            model.stored(worker, None, hashes, tier)
        else:
            index.removed(worker, hashes, tier)
            model.removed(worker, hashes, tier)
        if step % 100 == 0:
            query = [rng.randrange(1, 20) for _ in range(6)]
            assert index.match(query) == model.match(query)
    assert index._shift == 128 and len(index.workers()) == 80
    check_invariants(index)
    copy = load_index(dump_index(index), clock=lambda: 0.0)
    check_invariants(copy)
    for _ in range(50):
        query = [rng.randrange(1, 20) for _ in range(6)]
        assert copy.match(query) == index.match(query) == model.match(query)


def test_snapshot_keeps_free_slots() -> None:
    index = RadixIndex()
    for worker in ("a", "b", "c"):
        index.stored(worker, None, [1, 2], Tier.HOST if worker == "c" else Tier.DEVICE)
    index.remove_worker("b")
    copy = load_index(dump_index(index))
    assert copy.workers() == ["a", "c"] and copy.match([1, 2]) == index.match([1, 2])
    copy.stored("d", None, [1])  # takes b's free slot, as the original would
    index.stored("d", None, [1])
    assert copy._slot_of == index._slot_of and copy.stats() == index.stats()


WORKERS = st.sampled_from(["w0", "w1", "w2", "w3"])
HASH = st.integers(min_value=1, max_value=12)
HASHES = st.lists(HASH, min_size=1, max_size=6)
TIERS = st.sampled_from(list(Tier))


class IndexAgreesWithModel(RuleBasedStateMachine):
    """Random event sequences: the index and the brute-force model must give identical matches."""

    @initialize()
    def setup(self) -> None:
        self.clock = FakeClock()
        self.index = RadixIndex(RadixIndexConfig(approx_ttl_s=30), self.clock)
        self.model = BruteForceIndex()

    @rule(worker=WORKERS, parent=st.none() | HASH, hashes=HASHES, tier=TIERS)
    def stored(self, worker: str, parent: int | None, hashes: list[int], tier: Tier) -> None:
        self.index.stored(worker, parent, hashes, tier)
        self.model.stored(worker, parent, hashes, tier)

    @rule(worker=WORKERS, hashes=HASHES, tier=TIERS)
    def removed(self, worker: str, hashes: list[int], tier: Tier) -> None:
        self.index.removed(worker, hashes, tier)
        self.model.removed(worker, hashes, tier)

    @rule(worker=WORKERS)
    def cleared(self, worker: str) -> None:
        self.index.cleared(worker)
        self.model.cleared(worker)

    @rule(worker=WORKERS)
    def worker_gone(self, worker: str) -> None:
        self.index.remove_worker(worker)
        self.model.cleared(worker)

    @rule(worker=WORKERS, parent=st.none() | HASH, hashes=HASHES, ttl=st.floats(1, 60))
    def approximate(self, worker: str, parent: int | None, hashes: list[int], ttl: float) -> None:
        self.index.insert_approximate(worker, parent, hashes, self.clock.now + ttl)
        self.model.insert_approximate(worker, parent, hashes, self.clock.now + ttl)

    @rule(seconds=st.floats(0, 40))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule(query=st.lists(HASH, max_size=8))
    def match(self, query: list[int]) -> None:
        self.model.expire(self.clock.now)
        assert self.index.match(query) == self.model.match(query)

    @invariant()
    def structure_is_consistent(self) -> None:
        check_invariants(self.index)


IndexAgreesWithModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestIndexAgreesWithModel = IndexAgreesWithModel.TestCase
