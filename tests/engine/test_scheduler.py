"""The Sarathi-style scheduler against a fake runner: budget order, chunking, memory pressure,
preemption, aborts, page accounting, and a randomized run that checks every invariant after every step.

Pure Python, no model. The fake runner keeps a fake KV pool (``slot -> the prefix it encodes``) and
checks, for every token it computes, that every slot the token attends to still holds the right
prefix — so a page freed, shared or reused wrongly shows up as corrupt attention, as it would in
the real engine.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cache.api.sampling import SamplingParams
from engine.kv.page_pool import PagePool
from engine.kv.prefix_cache import Node, PrefixCache
from engine.scheduler import Batch, Scheduler, SchedulerConfig
from engine.sequence import FinishReason, Sequence, Status

PS = 4
EOS = 0


class FakeRunner:
    """Writes ``tuple(token_ids[: p + 1])`` into the slot of the token at position ``p`` and checks
    that attention only ever reads slots holding the prefix it expects."""

    def __init__(self, next_token=lambda seq: 7) -> None:
        self.kv: dict[int, tuple[int, ...]] = {}
        self.next_token = next_token
        self.computed_tokens = 0

    def run(self, batch: Batch) -> dict[Sequence, int]:
        out = {}
        for chunk in batch.chunks:
            seq, end = chunk.seq, chunk.start + chunk.length
            ids = seq.token_ids
            assert chunk.start == seq.num_computed and chunk.length >= 1 and end <= seq.num_tokens
            assert len(seq.pages) * PS >= end, "pages must cover every token computed this step"
            for p in range(chunk.start):
                got = self.kv.get(slot(seq, p))
                assert got == tuple(ids[: p + 1]), f"{seq.request_id}: KV of position {p} was overwritten"
            for p in range(chunk.start, end):
                self.kv[slot(seq, p)] = tuple(ids[: p + 1])
            self.computed_tokens += chunk.length
            if chunk.samples:
                out[seq] = self.next_token(seq)
        return out


def slot(seq: Sequence, position: int) -> int:
    return seq.pages[position // PS] * PS + position % PS


def make(
    request_id: str, prompt: list[int], max_tokens: int = 4, max_total: int = 1 << 30, eos: bool = False
) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return Sequence(request_id, list(prompt), params, frozenset({EOS}) if eos else frozenset(), max_total)


def build(num_pages: int = 64, budget: int = 32, max_running: int = 8, listener=None) -> Scheduler:
    pool = PagePool(num_pages)
    cache = PrefixCache(pool, PS, chained_hashes if listener else None, listener)
    return Scheduler(SchedulerConfig(PS, budget, max_running), pool, cache)


def chained_hashes(parent: int | None, token_ids: list[int]) -> list[int]:
    out, h = [], parent if parent is not None else 0
    for i in range(0, len(token_ids), PS):
        h = hash((h, *token_ids[i : i + PS]))
        out.append(h)
    return out


class EventMirror:
    """What a KV event consumer (the gateway's index) learns: the set of stored block hashes."""

    def __init__(self) -> None:
        self.hashes: set[int] = set()

    def stored(
        self, parent_hash: int | None, hashes: list[int], token_ids: list[int], medium: str | None
    ) -> None:
        assert medium is None, "a single pool names its device as vLLM does"
        assert parent_hash is None or parent_hash in self.hashes, "stored under an unknown parent"
        assert hashes == chained_hashes(parent_hash, token_ids)
        assert self.hashes.isdisjoint(hashes), "stored twice"
        self.hashes.update(hashes)

    def removed(self, hashes: list[int], medium: str | None) -> None:
        assert self.hashes.issuperset(hashes), "removed a block never stored"
        self.hashes.difference_update(hashes)

    def cleared(self) -> None:
        self.hashes.clear()

    def check(self, cache: PrefixCache) -> None:
        """The mirror equals the tree, and every block's hash is the chain of its whole prefix."""
        expected: set[int] = set()
        for node in tree_nodes(cache):
            tokens, up = [], node
            while up is not cache.root:
                tokens[:0] = up.key
                up = up.parent
            chain = chained_hashes(None, tokens)
            assert node.hashes == chain[-len(node.pages) :]
            expected.update(node.hashes)
        assert self.hashes == expected


def step(sched: Scheduler, runner: FakeRunner) -> Batch | None:
    batch = sched.schedule()
    if batch is not None:
        assert batch.num_tokens <= sched.config.max_batch_tokens
        sched.postprocess(batch, runner.run(batch))
    check_invariants(sched)
    return batch


def run_all(sched: Scheduler, runner: FakeRunner, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if not sched.has_work():
            return
        assert step(sched, runner) is not None, "the scheduler stalled with work left"
    raise AssertionError("did not finish")


def tree_nodes(cache: PrefixCache) -> list[Node]:
    out, stack = [], list(cache.root.children.values())
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children.values())
    return out


def path_pages(cache: PrefixCache, node: Node | None) -> list[int]:
    pages: list[int] = []
    while node is not None and node is not cache.root:
        pages[:0] = node.pages
        node = node.parent
    return pages


def check_invariants(sched: Scheduler) -> None:
    """Every page is owned exactly once (free, tree, or one running sequence's private pages);
    lock counts equal the running sequences that hold each tree node; pages cover computed tokens."""
    pool, cache, page_size = sched.pool, sched.cache, sched.config.page_size
    owners: dict[int, str] = {p: "free" for p in pool._free}
    assert len(owners) == pool.num_free, "a page is on the free list twice"

    def own(page: int, who: str) -> None:
        assert page not in owners, f"page {page} owned by {who} and {owners[page]}"
        owners[page] = who

    nodes = tree_nodes(cache)
    for node in nodes:
        for p in node.pages:
            own(p, "tree")
    assert cache.num_pages == sum(len(n.pages) for n in nodes)
    expected_locks = dict.fromkeys(map(id, nodes), 0)
    for seq in sched.running:
        assert seq.status is Status.RUNNING
        assert len(seq.pages) * page_size >= seq.num_computed, "pages cover the computed tokens"
        assert seq.num_tree_pages * page_size <= seq.num_computed
        assert seq.pages[: seq.num_tree_pages] == path_pages(cache, seq.cache_node)
        for p in seq.pages[seq.num_tree_pages :]:
            own(p, seq.request_id)
        node = seq.cache_node
        while node is not None and node is not cache.root:
            expected_locks[id(node)] += 1
            node = node.parent
    for seq in sched.waiting:
        assert seq.status is Status.WAITING and seq.pages == [] and seq.cache_node is None
    assert len(owners) == pool.num_pages, "a page is lost (neither free, cached nor held)"
    for node in nodes:
        assert node.lock_ref == expected_locks[id(node)], "lock counts must equal the holders"
    assert cache.evictable_pages == sum(len(n.pages) for n in nodes if n.lock_ref == 0)
    assert len(sched.running) <= sched.config.max_running


def check_idle(sched: Scheduler) -> None:
    assert not sched.has_work()
    assert sched.pool.num_used == sched.cache.num_pages
    assert sched.pages_held_by_requests == 0
    sched.cache.reset()
    assert sched.pool.num_used == 0 and sched.pool.num_free == sched.pool.num_pages


# -- budget order and chunking ---------------------------------------------------------------------
def test_long_prompt_is_chunked_to_the_budget() -> None:
    sched, runner = build(budget=16), FakeRunner()
    seq = make("a", list(range(1, 51)), max_tokens=2)
    sched.add(seq)
    lengths = []
    while sched.has_work():
        lengths.append([c.length for c in step(sched, runner).chunks])
    assert lengths == [[16], [16], [16], [2], [1]]
    assert seq.output_ids == [7, 7] and seq.finish_reason is FinishReason.LENGTH
    check_idle(sched)


def test_step_order_is_decodes_then_ongoing_prefills_then_new() -> None:
    sched, runner = build(budget=16), FakeRunner()
    d1, d2 = make("d1", [1, 2, 3], max_tokens=10), make("d2", [4, 5, 6], max_tokens=10)
    sched.add(d1)
    sched.add(d2)
    step(sched, runner)  # both prefills (3 + 3 tokens) in one step
    assert d1.output_ids and d2.output_ids
    long = make("long", list(range(10, 40)), max_tokens=1)
    sched.add(long)
    batch = step(sched, runner)
    assert [(c.seq.request_id, c.length) for c in batch.chunks] == [("d1", 1), ("d2", 1), ("long", 14)]
    new = make("new", [50, 51, 52, 53, 54])
    sched.add(new)
    batch = step(sched, runner)
    # the ongoing prefill takes what decodes leave; the new request gets the rest
    assert [(c.seq.request_id, c.length) for c in batch.chunks] == [
        ("d1", 1),
        ("d2", 1),
        ("long", 14),
    ]
    batch = step(sched, runner)
    assert [(c.seq.request_id, c.length) for c in batch.chunks] == [
        ("d1", 1),
        ("d2", 1),
        ("long", 2),
        ("new", 5),
    ]
    run_all(sched, runner)
    check_idle(sched)


def test_max_running_caps_admission() -> None:
    sched, runner = build(budget=64, max_running=2), FakeRunner()
    seqs = [make(f"s{i}", [i + 1] * 5, max_tokens=3) for i in range(4)]
    for s in seqs:
        sched.add(s)
    batch = step(sched, runner)
    assert {c.seq.request_id for c in batch.chunks} == {"s0", "s1"}
    run_all(sched, runner)
    assert all(s.finish_reason is FinishReason.LENGTH and len(s.output_ids) == 3 for s in seqs)
    check_idle(sched)


# -- prefix reuse ------------------------------------------------------------------------------------
def test_second_request_reuses_the_cached_prefix() -> None:
    sched, runner = build(), FakeRunner()
    shared = list(range(1, 23))  # 22 tokens: 5 whole pages
    a = make("a", [*shared, 90, 91], max_tokens=2)
    sched.add(a)
    run_all(sched, runner)
    before = runner.computed_tokens
    b = make("b", [*shared, 80, 81, 82], max_tokens=2)
    sched.add(b)
    run_all(sched, runner)
    assert b.num_cached_prompt == 20
    assert runner.computed_tokens - before == 25 - 20 + 1  # the suffix, then one decode step
    check_idle(sched)


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    sched, runner = build(), FakeRunner()
    prompt = list(range(1, 17))  # exactly 4 pages
    sched.add(make("a", prompt, max_tokens=1))
    run_all(sched, runner)
    b = make("b", prompt, max_tokens=1)
    sched.add(b)
    batch = step(sched, runner)
    # the match stops one token short, at a page boundary: the last page is recomputed
    assert b.num_cached_prompt == 12 and [(c.start, c.length) for c in batch.chunks] == [(12, 4)]
    assert b.output_ids == [7]
    check_idle(sched)


def test_cached_tokens_of_a_preempted_request_are_counted_once() -> None:
    sched, runner = build(num_pages=6, budget=32), FakeRunner()
    a = make("a", list(range(1, 9)), max_tokens=12)  # 8 prompt tokens: grows to 5 pages
    b = make("b", list(range(20, 28)), max_tokens=12)
    sched.add(a)
    sched.add(b)
    run_all(sched, runner)
    assert sched.num_preemptions >= 1
    assert (a.num_cached_prompt, b.num_cached_prompt) == (0, 0)
    assert len(a.output_ids) == len(b.output_ids) == 12
    check_idle(sched)


# -- memory pressure ----------------------------------------------------------------------------------
def test_new_request_waits_when_pages_run_out() -> None:
    sched, runner = build(num_pages=4, budget=64), FakeRunner()
    a = make("a", list(range(1, 13)), max_tokens=3)  # 12 + 3 tokens: 4 pages
    b = make("b", list(range(20, 30)), max_tokens=3)
    sched.add(a)
    sched.add(b)
    batch = step(sched, runner)
    # a gets its 3 pages; b gets the last free page for a first chunk of 4 tokens
    assert [(c.seq.request_id, c.length) for c in batch.chunks] == [("a", 12), ("b", 4)]
    run_all(sched, runner)
    assert len(a.output_ids) == len(b.output_ids) == 3
    check_idle(sched)


def test_decode_preempts_the_newest_and_it_recomputes_from_the_cache() -> None:
    sched, runner = build(num_pages=5, budget=64), FakeRunner()
    old = make("old", list(range(1, 8)), max_tokens=10)  # 7 + 10 tokens: needs 5 pages at the end
    new = make("new", list(range(20, 27)), max_tokens=10)
    sched.add(old)
    sched.add(new)
    step(sched, runner)
    assert old.status is new.status is Status.RUNNING
    while new.status is Status.RUNNING:
        step(sched, runner)
    assert new.status is Status.WAITING and sched.waiting[0] is new and sched.num_preemptions == 1
    assert old.status is Status.RUNNING
    run_all(sched, runner)
    assert old.output_ids == [7] * 10 and new.output_ids == [7] * 10
    check_idle(sched)


def test_eviction_never_takes_pages_of_a_running_request() -> None:
    sched, runner = build(num_pages=8, budget=64), FakeRunner()
    for i in range(3):  # fill the cache with finished requests' pages
        sched.add(make(f"old{i}", [100 + i] * 8, max_tokens=1))
        run_all(sched, runner)
    assert sched.cache.num_pages == 6
    live = make("live", [50] * 9, max_tokens=20)
    sched.add(live)
    step(sched, runner)
    sched.add(make("other", [60] * 9, max_tokens=20))
    run_all(sched, runner)  # the fake runner fails if live's KV is ever overwritten
    assert live.output_ids == [7] * 20
    check_idle(sched)


def test_context_length_finishes_with_length() -> None:
    sched, runner = build(), FakeRunner()
    seq = make("a", [1, 2, 3], max_tokens=100, max_total=6)
    sched.add(seq)
    run_all(sched, runner)
    assert seq.num_tokens == 6 and seq.finish_reason is FinishReason.LENGTH
    check_idle(sched)


def test_eos_and_stop_token_ids_finish_with_stop() -> None:
    sched = build()
    tokens = iter([5, EOS])
    runner = FakeRunner(lambda seq: next(tokens))
    a = make("a", [1, 2, 3], max_tokens=10, eos=True)
    sched.add(a)
    run_all(sched, runner)
    assert a.output_ids == [5, EOS] and a.finish_reason is FinishReason.STOP
    b = Sequence("b", [1, 2], SamplingParams(max_tokens=10, stop_token_ids=(9,)))
    runner.next_token = lambda seq: 9
    sched.add(b)
    run_all(sched, runner)
    assert b.output_ids == [9] and b.finish_reason is FinishReason.STOP
    c = Sequence("c", [1, 2], SamplingParams(max_tokens=3, ignore_eos=True), frozenset({9}))
    sched.add(c)
    run_all(sched, runner)
    assert c.output_ids == [9, 9, 9] and c.finish_reason is FinishReason.LENGTH
    check_idle(sched)


# -- aborts ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("when", ["waiting", "mid-prefill", "decoding"])
def test_abort_frees_the_request_pages(when: str) -> None:
    sched, runner = build(budget=8), FakeRunner()
    seq = make("a", list(range(1, 22)), max_tokens=50)
    sched.add(seq)
    if when == "mid-prefill":
        step(sched, runner)
        assert seq.in_prefill and seq.pages
    elif when == "decoding":
        while not seq.output_ids:
            step(sched, runner)
        step(sched, runner)
    sched.finish(seq, FinishReason.ABORT)
    check_invariants(sched)
    assert seq.finish_reason is FinishReason.ABORT and seq.pages == [] and seq.cache_node is None
    assert sched.pages_held_by_requests == 0
    sched.finish(seq, FinishReason.ABORT)  # idempotent
    check_idle(sched)


# -- randomized ------------------------------------------------------------------------------------------
@st.composite
def workloads(draw: st.DrawFn) -> dict:
    num_pages = draw(st.integers(3, 16))
    return {
        "num_pages": num_pages,
        "budget": draw(st.integers(4, 32)),
        "max_running": draw(st.integers(1, 6)),
        # few distinct tokens: prompts share prefixes (and whole pages) often
        "prefixes": draw(st.lists(st.lists(st.integers(1, 3), max_size=12), min_size=1, max_size=3)),
    }


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.data())
def test_random_arrivals_aborts_and_steps_keep_every_invariant_and_kv_events(
    work: dict, data: st.DataObject
) -> None:
    mirror = EventMirror()
    sched = build(work["num_pages"], work["budget"], min(work["max_running"], work["budget"]), mirror)
    context = work["num_pages"] * PS  # as the engine does: the context never exceeds the pool
    runner = FakeRunner(lambda seq: data.draw(st.integers(0, 7), label="token"))  # 0 = EOS
    ids = itertools.count()
    seqs: list[Sequence] = []
    for _ in range(data.draw(st.integers(1, 40), label="actions")):
        action = data.draw(st.sampled_from(["add", "add", "step", "step", "abort"]), label="action")
        if action == "add":
            prefix = data.draw(st.sampled_from(work["prefixes"]))
            suffix = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=16))
            prompt = (prefix + suffix)[: context - 1]
            seq = make(f"r{next(ids)}", prompt, data.draw(st.integers(1, 24)), context, eos=True)
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
    event(f"preempted: {sched.num_preemptions > 0}")
    event(f"cache hit: {any(s.num_cached_prompt for s in seqs)}")
    for seq in seqs:
        assert seq.finished
        if seq.finish_reason is not FinishReason.ABORT:
            assert 1 <= len(seq.output_ids) <= seq.sampling.max_tokens
    check_idle(sched)
    assert mirror.hashes == set()
