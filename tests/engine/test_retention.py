"""Retention pins over the radix prefix cache: a pinned prefix outlives eviction storms until it expires,
within per-namespace and overall budgets, and only ever in its own namespace.

Pure Python, no model: a fake clock, a small pool.
"""

from __future__ import annotations

import pytest

from engine.kv.page_pool import PagePool
from engine.kv.prefix_cache import PrefixCache
from engine.kv.retention import RetentionPins
from tests.engine.test_prefix_cache import PS, check_tree, toks


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def insert(cache: PrefixCache, token_ids: list[int], namespace: str = "") -> None:
    """What a finished request leaves: its pages in the tree, evicting what it must to get them."""
    need = len(token_ids) // PS
    if cache.pool.num_free < need:
        cache.evict(need - cache.pool.num_free)
    cache.insert(token_ids, cache.pool.alloc(need), namespace)


def storm(cache: PrefixCache, rounds: int, first: int = 100, namespace: str = "") -> None:
    """Fresh 4-page prompts: far more than the pool holds."""
    for i in range(rounds):
        start = first + 4 * i
        insert(cache, toks(start, start + 1, start + 2, start + 3), namespace)


def cached_pages(cache: PrefixCache, token_ids: list[int], namespace: str = "") -> int:
    return len(cache.match_prefix(token_ids, namespace, count_hit=False)[0])


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_pinned_prefix_survives_a_storm_that_evicts_an_unpinned_one_of_its_size(clock: Clock) -> None:
    cache = PrefixCache(PagePool(16), PS)
    pins = RetentionPins(cache, max_pages=8, max_pages_per_namespace=8, clock=clock)
    pinned, unpinned = toks(1, 2, 3, 4), toks(5, 6, 7, 8)
    insert(cache, pinned)
    insert(cache, unpinned)  # newer: LRU alone would keep it longer than ``pinned``
    assert pins.pin(pinned, "", ttl_s=60) == 4
    assert pins.pinned_pages == pins.charged_pages == 4 and len(pins) == 1
    storm(cache, rounds=10)
    assert cached_pages(cache, pinned) == 4
    assert cached_pages(cache, unpinned) == 0
    check_tree(cache)


def test_pins_expire_and_their_pages_are_evictable_again(clock: Clock) -> None:
    cache = PrefixCache(PagePool(16), PS)
    pins = RetentionPins(cache, max_pages=8, max_pages_per_namespace=8, clock=clock)
    prompt = toks(1, 2, 3)
    insert(cache, prompt)
    pins.pin(prompt, "", ttl_s=30)
    assert cache.evictable_pages == 0
    clock.now += 29
    assert pins.expire() == 0 and len(pins) == 1
    clock.now += 1
    assert pins.expire() == 1 and len(pins) == 0
    assert pins.pinned_pages == pins.charged_pages == 0
    assert cache.evictable_pages == cache.num_pages == 3
    storm(cache, rounds=10)
    assert cached_pages(cache, prompt) == 0
    check_tree(cache)


def test_pinning_a_prefix_again_refreshes_one_pin(clock: Clock) -> None:
    cache = PrefixCache(PagePool(16), PS)
    pins = RetentionPins(cache, max_pages=8, max_pages_per_namespace=8, clock=clock)
    prompt = toks(1, 2)
    insert(cache, prompt)
    pins.pin(prompt, "", ttl_s=10)
    clock.now += 5
    pins.pin(prompt, "", ttl_s=10)  # now expires at +15
    assert len(pins) == 1 and pins.charged_pages == 2
    clock.now += 6
    assert pins.expire() == 0
    clock.now += 5
    assert pins.expire() == 1


def test_only_the_asked_tokens_in_whole_pages_are_pinned(clock: Clock) -> None:
    cache = PrefixCache(PagePool(16), PS)
    pins = RetentionPins(cache, max_pages=8, max_pages_per_namespace=8, clock=clock)
    prompt = toks(1, 2, 3, 4)
    insert(cache, prompt)
    assert pins.pin(prompt[: 2 * PS + 1], "", ttl_s=60) == 2  # 2 pages and a token: 2 pages
    storm(cache, rounds=10)
    assert cached_pages(cache, prompt) == 2
    assert pins.pin([7] * (PS - 1), "", ttl_s=60) == 0  # shorter than a page
    assert pins.pin(toks(9), "", ttl_s=60) == 0  # not cached: nothing to hold
    check_tree(cache)


def test_the_namespace_budget_releases_that_namespace_s_oldest_pins(clock: Clock) -> None:
    cache = PrefixCache(PagePool(32), PS)
    pins = RetentionPins(cache, max_pages=16, max_pages_per_namespace=6, clock=clock)
    a1, a2, a3, b1 = toks(1, 2, 3), toks(4, 5, 6), toks(7, 8), toks(1, 2, 3)
    for prompt, ns in ((a1, "a"), (a2, "a"), (a3, "a"), (b1, "b")):
        insert(cache, prompt, ns)
    assert pins.pin(b1, "b", ttl_s=60) == 3
    assert pins.pin(a1, "a", ttl_s=60) == 3
    assert pins.pin(a2, "a", ttl_s=60) == 3
    assert pins.namespace_pages("a") == 6
    assert pins.pin(a3, "a", ttl_s=60) == 2  # over a's 6 pages: a1, the oldest, is released
    assert pins.namespace_pages("a") == 5 and pins.namespace_pages("b") == 3
    storm(cache, rounds=12, namespace="a")
    assert cached_pages(cache, a1, "a") == 0
    assert cached_pages(cache, a2, "a") == 3 and cached_pages(cache, a3, "a") == 2
    assert cached_pages(cache, b1, "b") == 3  # another tenant's pin is never released for a's
    # a prefix longer than the namespace's budget is pinned up to the budget
    long = toks(11, 12, 13, 14, 15, 16, 17, 18)
    insert(cache, long, "c")
    assert pins.pin(long, "c", ttl_s=60) == 6
    check_tree(cache)


def test_the_overall_budget_refuses_new_pins(clock: Clock) -> None:
    cache = PrefixCache(PagePool(32), PS)
    pins = RetentionPins(cache, max_pages=5, max_pages_per_namespace=3, clock=clock)
    for ns in "abc":
        insert(cache, toks(1, 2, 3), ns)
    assert pins.pin(toks(1, 2, 3), "a", ttl_s=60) == 3
    assert pins.pin(toks(1, 2, 3), "b", ttl_s=60) == 0  # 6 > 5: refused, a's pin stays
    assert pins.refused == 1 and pins.charged_pages == 3
    assert pins.pin(toks(1, 2), "c", ttl_s=60) == 2
    assert pins.charged_pages == 5 == pins.pinned_pages


def test_a_tenant_s_pin_never_holds_another_tenant_s_blocks(clock: Clock) -> None:
    cache = PrefixCache(PagePool(16), PS)
    pins = RetentionPins(cache, max_pages=8, max_pages_per_namespace=8, clock=clock)
    prompt = toks(1, 2, 3)
    insert(cache, prompt, "a")
    insert(cache, prompt, "b")  # the same tokens, cached separately for each tenant
    assert pins.pin(prompt, "b", ttl_s=60) == 3
    b_root, a_root = cache.roots["b"], cache.roots["a"]
    assert all(n.lock_ref == 0 for n in a_root.children.values())
    assert all(n.lock_ref == 1 for n in b_root.children.values())
    storm(cache, rounds=10)
    assert cached_pages(cache, prompt, "a") == 0
    assert cached_pages(cache, prompt, "b") == 3
    assert pins.pin(prompt, "c", ttl_s=60) == 0  # c has nothing cached: nothing of a's or b's is held


def test_pins_of_one_conversation_count_shared_pages_once(clock: Clock) -> None:
    cache = PrefixCache(PagePool(16), PS)
    pins = RetentionPins(cache, max_pages=10, max_pages_per_namespace=10, clock=clock)
    turn1, turn2 = toks(1, 2), toks(1, 2, 3, 4)
    insert(cache, turn2)
    pins.pin(turn1, "", ttl_s=60)
    pins.pin(turn2, "", ttl_s=60)
    assert pins.charged_pages == 6 and pins.pinned_pages == 4
    pins.release_all()
    assert len(pins) == 0 and pins.pinned_pages == pins.charged_pages == 0
    assert cache.evictable_pages == cache.num_pages
    cache.reset()
    check_tree(cache)


def test_pins_need_room_left_for_requests() -> None:
    cache = PrefixCache(PagePool(8), PS)
    with pytest.raises(AssertionError):
        RetentionPins(cache, max_pages=8, max_pages_per_namespace=8)
    pins = RetentionPins(cache, max_pages=0, max_pages_per_namespace=0)
    insert(cache, toks(1))
    assert pins.pin(toks(1), "", ttl_s=60) == 0  # a zero budget: pinning is off
