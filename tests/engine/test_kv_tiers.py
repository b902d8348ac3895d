"""KV tiers (device pool over host pool over disk) against the scheduler's fake runner: demotion,
load-back, write policies, restart from disk, bad page files, and a randomized run whose per-medium
event mirror must equal the radix tree's tiers after every action.

Pure Python, no model. ``FakeMover`` moves the fake runner's KV (``slot -> the prefix it encodes``)
between tiers, so a page loaded back with the wrong content shows up as corrupt attention.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cache.index.radix_index import RadixIndex
from cache.wire.tiers import MEDIUM_DEVICE, MEDIUM_DISK, MEDIUM_HOST, Tier, tier_from_medium
from engine.kv.disk_store import SUFFIX, DiskStore
from engine.kv.load_cost import LoadCost
from engine.kv.lower_tiers import LowerTiers
from engine.kv.page_pool import PagePool
from engine.kv.prefix_cache import Node, PrefixCache
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import FinishReason
from tests.engine.test_scheduler import (
    PS,
    FakeRunner,
    chained_hashes,
    check_invariants,
    make,
    run_all,
    step,
)


class FakeMover:
    """A ``PageMover`` over the fake runner's KV dict and a host dict of the same shape."""

    page_bytes = 2048
    copy_bytes_per_s = None

    def __init__(self, runner: FakeRunner) -> None:
        self.device, self.host = runner.kv, {}

    @staticmethod
    def _move(src: dict, src_pages: list[int], dst: dict, dst_pages: list[int]) -> None:
        for s, d in zip(src_pages, dst_pages, strict=True):
            for o in range(PS):
                value = src.get(s * PS + o)
                if value is None:
                    dst.pop(d * PS + o, None)
                else:
                    dst[d * PS + o] = value

    def to_host(self, device_pages: list[int], host_pages: list[int]) -> None:
        self._move(self.device, device_pages, self.host, host_pages)

    def to_device(self, host_pages: list[int], device_pages: list[int]) -> None:
        self._move(self.host, host_pages, self.device, device_pages)

    def read_page(self, page: int, on_host: bool) -> bytes:
        src = self.host if on_host else self.device
        data = json.dumps([src.get(page * PS + o) for o in range(PS)]).encode()
        return data.ljust(self.page_bytes)

    def write_page_to_device(self, page: int, data: bytes) -> None:
        for o, value in enumerate(json.loads(data.rstrip())):
            if value is None:
                self.device.pop(page * PS + o, None)
            else:
                self.device[page * PS + o] = tuple(value)


class TierMirror:
    """What an indexer learns from the events, per medium: the block hashes each tier holds; and the
    gateway's own index fed the same events (``index``, this engine as worker "w")."""

    def __init__(self) -> None:
        self.tiers: dict[str, set[int]] = {MEDIUM_DEVICE: set(), MEDIUM_HOST: set(), MEDIUM_DISK: set()}
        self.log: list[tuple[str, str, tuple[int, ...]]] = []
        self.index = RadixIndex()

    def stored(
        self, parent_hash: int | None, hashes: list[int], token_ids: list[int], medium: str | None
    ) -> None:
        assert medium in self.tiers
        held = set().union(*self.tiers.values())
        assert parent_hash is None or parent_hash in held, "stored under a block no tier holds"
        assert hashes == chained_hashes(parent_hash, token_ids)
        assert self.tiers[medium].isdisjoint(hashes), f"stored twice in {medium}"
        self.tiers[medium].update(hashes)
        self.log.append(("stored", medium, tuple(hashes)))
        self.index.stored("w", parent_hash, hashes, tier_from_medium(medium))

    def removed(self, hashes: list[int], medium: str | None) -> None:
        assert medium in self.tiers and self.tiers[medium].issuperset(hashes), "removed what it lacks"
        self.tiers[medium].difference_update(hashes)
        self.log.append(("removed", medium, tuple(hashes)))
        self.index.removed("w", hashes, tier_from_medium(medium))

    def cleared(self) -> None:
        for held in self.tiers.values():
            held.clear()
        self.index.cleared("w")

    def check(self, cache: PrefixCache) -> None:
        """The mirror equals the tree's tiers; page ownership in the lower tiers is exact."""
        truth: dict[str, set[int]] = {m: set() for m in self.tiers}
        host_pages: list[int] = []
        for node in cache.nodes():
            assert node.on_device or node.host_pages is not None or node.on_disk, "a node in no tier"
            if node.on_device:
                assert node.parent is not None
                assert node.parent.parent is None or node.parent.on_device, "device is prefix-closed"
                truth[MEDIUM_DEVICE].update(node.hashes)
            if node.host_pages is not None:
                assert len(node.host_pages) * PS == len(node.key)
                host_pages.extend(node.host_pages)
                truth[MEDIUM_HOST].update(node.hashes)
            if node.on_disk:
                truth[MEDIUM_DISK].update(node.hashes)
            assert node.pinned == 0
        assert self.tiers == truth
        # The gateway's index keeps every tier apart: no removal from one tier lost a block another holds.
        masks = list(self.index.tier_masks())
        for medium, tier in (
            (MEDIUM_DEVICE, Tier.DEVICE),
            (MEDIUM_HOST, Tier.HOST),
            (MEDIUM_DISK, Tier.DISK),
        ):
            assert {h for h, *by_tier in masks if by_tier[tier]} == truth[medium], medium
        assert len(masks) == len(set().union(*truth.values()))
        lower = cache.lower
        assert lower is not None
        assert len(host_pages) == len(set(host_pages)) == lower.host_pool.num_used
        assert not any(lower.host_pool._is_free[p] for p in host_pages)
        if lower.disk is not None:
            assert lower.disk.names == truth[MEDIUM_DISK]
            assert {p.name for p in lower.disk.directory.glob(f"*{SUFFIX}")} == {
                f"{h:016x}{SUFFIX}" for h in truth[MEDIUM_DISK]
            }


def build_tiered(
    num_pages: int,
    host_pages: int,
    policy: str = "write_through",
    disk_dir: Path | None = None,
    disk_pages: int = 64,
    budget: int = 32,
    max_running: int = 8,
    min_load_tokens: int = PS,
    runner: FakeRunner | None = None,
    prefill_tokens_per_s: float | None = None,  # the engine's measured rate (None: not yet measured)
) -> tuple[Scheduler, FakeRunner, TierMirror]:
    runner = runner or FakeRunner()
    mover = FakeMover(runner)
    disk = DiskStore(disk_dir, disk_pages, "fake", mover.page_bytes) if disk_dir else None
    cost = LoadCost(min_load_tokens, lambda: prefill_tokens_per_s)
    lower = LowerTiers(PagePool(host_pages), mover, policy, cost, disk)
    mirror = TierMirror()
    pool = PagePool(num_pages)
    cache = PrefixCache(pool, PS, chained_hashes, mirror, lower=lower)
    if disk is not None:
        lower.restore_from_disk()
    return Scheduler(SchedulerConfig(PS, budget, max_running), pool, cache), runner, mirror


def serve(sched: Scheduler, runner: FakeRunner, mirror: TierMirror, request_id: str, prompt: list[int]):
    seq = make(request_id, prompt, max_tokens=2)
    sched.add(seq)
    while sched.has_work():
        step(sched, runner)
        mirror.check(sched.cache)
    return seq


def prompt(first: int, pages: int) -> list[int]:
    return [first + i for i in range(pages * PS)] + [99]


def test_an_evicted_prefix_is_demoted_to_host_and_loaded_back() -> None:
    sched, runner, mirror = build_tiered(num_pages=8, host_pages=32, policy="write_back")
    a, b = prompt(100, 5), prompt(200, 5)
    serve(sched, runner, mirror, "a1", a)
    assert not mirror.tiers[MEDIUM_HOST], "write_back: no host copy before an eviction"
    serve(sched, runner, mirror, "b", b)  # evicts a's pages from the device
    demoted = [e for e in mirror.log if e[0] == "removed" and e[1] == MEDIUM_DEVICE]
    assert demoted and all(("stored", MEDIUM_HOST, e[2]) in mirror.log for e in demoted)
    before = runner.computed_tokens
    again = serve(sched, runner, mirror, "a2", a)
    assert again.num_cached_prompt == 5 * PS
    assert sched.cache.lower.loaded_tokens[MEDIUM_HOST] > 0
    assert runner.computed_tokens - before == 1 + 1  # the last prompt token, then one decode


def test_write_through_copies_at_insert_and_selective_at_the_second_hit() -> None:
    sched, runner, mirror = build_tiered(num_pages=16, host_pages=32, policy="write_through")
    serve(sched, runner, mirror, "a", prompt(100, 3))
    assert mirror.tiers[MEDIUM_HOST] == mirror.tiers[MEDIUM_DEVICE] != set()

    sched, runner, mirror = build_tiered(num_pages=16, host_pages=32, policy="write_through_selective")
    a = prompt(100, 3)
    serve(sched, runner, mirror, "a1", a)
    serve(sched, runner, mirror, "a2", a)
    assert not mirror.tiers[MEDIUM_HOST]
    serve(sched, runner, mirror, "a3", a)
    assert mirror.tiers[MEDIUM_HOST], "copied down at its second hit"


def test_selective_drops_a_cold_prefix_on_eviction() -> None:
    sched, runner, mirror = build_tiered(num_pages=8, host_pages=32, policy="write_through_selective")
    serve(sched, runner, mirror, "a", prompt(100, 5))
    serve(sched, runner, mirror, "b", prompt(200, 5))
    assert not mirror.tiers[MEDIUM_HOST]
    assert sched.cache.match_and_load(prompt(100, 5))[0] == [], "a cold prefix is recomputed"


def test_a_short_lower_tier_prefix_is_recomputed_not_loaded() -> None:
    sched, runner, mirror = build_tiered(num_pages=8, host_pages=32, min_load_tokens=8 * PS)
    a = prompt(100, 5)
    serve(sched, runner, mirror, "a1", a)
    serve(sched, runner, mirror, "b", prompt(200, 5))
    again = serve(sched, runner, mirror, "a2", a)
    assert again.num_cached_prompt == 0 and sched.cache.lower.loaded_tokens[MEDIUM_HOST] == 0
    a_hashes = set(chained_hashes(None, a[: 5 * PS]))
    assert a_hashes <= mirror.tiers[MEDIUM_DEVICE], "its recompute puts it back on the device"


def test_a_load_back_that_does_not_pay_is_declined() -> None:
    sched, runner, mirror = build_tiered(num_pages=8, host_pages=32, prefill_tokens_per_s=1e9)
    sched.cache.lower.mover.copy_bytes_per_s = 1.0  # measured: one byte a second
    a = prompt(100, 5)
    serve(sched, runner, mirror, "a1", a)
    serve(sched, runner, mirror, "b", prompt(200, 5))
    assert serve(sched, runner, mirror, "a2", a).num_cached_prompt == 0


def test_restart_serves_from_disk_and_announces_it(tmp_path: Path) -> None:
    sched, runner, mirror = build_tiered(num_pages=16, host_pages=32, disk_dir=tmp_path)
    a = prompt(100, 5)
    serve(sched, runner, mirror, "a1", a)
    assert len(mirror.tiers[MEDIUM_DISK]) == 5
    # a new engine: empty device pool, empty host pool, same directory
    sched, runner, mirror = build_tiered(num_pages=16, host_pages=32, disk_dir=tmp_path)
    assert len(mirror.tiers[MEDIUM_DISK]) == 5 and not mirror.tiers[MEDIUM_DEVICE]
    again = serve(sched, runner, mirror, "a2", a)
    assert again.num_cached_prompt == 5 * PS and sched.cache.lower.loaded_tokens[MEDIUM_DISK] == 5 * PS


@pytest.mark.parametrize("when", ["before-restart", "after-restart"])
@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_a_bad_page_file_is_recomputed_never_served(tmp_path: Path, when: str, damage: str) -> None:
    sched, runner, mirror = build_tiered(num_pages=16, host_pages=32, disk_dir=tmp_path)
    a = prompt(100, 5)
    serve(sched, runner, mirror, "a1", a)
    third = chained_hashes(None, a[: 3 * PS])[2]
    path = tmp_path / f"{third:016x}{SUFFIX}"

    def spoil() -> None:
        data = bytearray(path.read_bytes())
        if damage == "corrupt":
            data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data if damage == "corrupt" else data[: len(data) // 2]))

    if when == "before-restart":
        spoil()
    sched, runner, mirror = build_tiered(num_pages=16, host_pages=32, disk_dir=tmp_path)
    if when == "after-restart":
        spoil()
    again = serve(sched, runner, mirror, "a2", a)  # the fake runner fails on any wrong KV
    lower = sched.cache.lower
    if when == "before-restart":  # found at the scan: two good pages, the rest unreachable
        assert again.num_cached_prompt == 2 * PS
    else:  # found at the load: all or nothing, so all of it is recomputed
        assert again.num_cached_prompt == 0 and lower.bad_page_files == 1
    assert again.output_ids == [7, 7]


# -- randomized ------------------------------------------------------------------------------------------
@st.composite
def workloads(draw: st.DrawFn) -> dict:
    return {
        "num_pages": draw(st.integers(3, 12)),
        "host_pages": draw(st.integers(0, 16)),
        "disk_pages": draw(st.integers(0, 24)),
        "policy": draw(st.sampled_from(["write_through", "write_through_selective", "write_back"])),
        "budget": draw(st.integers(4, 32)),
        "max_running": draw(st.integers(1, 4)),
        "min_load_tokens": draw(st.sampled_from([PS, 2 * PS])),
        "prefixes": draw(st.lists(st.lists(st.integers(1, 3), max_size=16), min_size=1, max_size=4)),
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.data())
def test_random_runs_keep_every_tier_consistent_with_its_events(work: dict, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        disk_dir = Path(tmp) if work["disk_pages"] else None
        runner = FakeRunner(lambda seq: data.draw(st.integers(0, 7), label="token"))
        sched, runner, mirror = build_tiered(
            work["num_pages"],
            work["host_pages"],
            work["policy"],
            disk_dir,
            work["disk_pages"],
            work["budget"],
            min(work["max_running"], work["budget"]),
            work["min_load_tokens"],
            runner,
        )
        context = work["num_pages"] * PS
        ids, seqs = itertools.count(), []
        for _ in range(data.draw(st.integers(1, 40), label="actions")):
            action = data.draw(st.sampled_from(["add", "add", "step", "step", "abort"]), label="action")
            if action == "add":
                prefix = data.draw(st.sampled_from(work["prefixes"]))
                suffix = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=12))
                seq = make(
                    f"r{next(ids)}",
                    (prefix + suffix)[: context - 1],
                    data.draw(st.integers(1, 12)),
                    context,
                    eos=True,
                )
                seqs.append(seq)
                sched.add(seq)
            elif action == "abort" and seqs:
                sched.finish(data.draw(st.sampled_from(seqs)), FinishReason.ABORT)
            elif sched.has_work():
                assert step(sched, runner) is not None, "the scheduler stalled with work left"
            check_invariants(sched)
            mirror.check(sched.cache)
        run_all(sched, runner)
        mirror.check(sched.cache)
        lower = sched.cache.lower
        event(f"loaded back: {any(lower.loaded_tokens.values())}")
        event(
            f"host-only nodes: {any(n.host_pages is not None and not n.on_device for n in sched.cache.nodes())}"
        )
        for seq in seqs:
            assert seq.finished
        sched.cache.reset()
        mirror.check(sched.cache)
        assert not any(mirror.tiers.values()) and lower.host_pool.num_used == 0


def test_nodes_split_keep_their_tiers() -> None:
    sched, runner, mirror = build_tiered(num_pages=8, host_pages=32)
    serve(sched, runner, mirror, "a", prompt(100, 4))
    serve(sched, runner, mirror, "b", prompt(200, 5))  # a is demoted: host only
    node: Node = next(n for n in sched.cache.nodes() if not n.on_device)
    assert node.host_pages is not None
    short = [*prompt(100, 2)[:-1], 55, 99]  # shares two pages with a
    serve(sched, runner, mirror, "c", short)  # loads two pages back: splits a's node
    mirror.check(sched.cache)
