"""Radix prefix cache over KV pages: matching, insertion, splits, dedup, locking, LRU eviction.

Pure Python, no model: every test runs in milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from engine.kv.page_pool import OutOfPages, PagePool
from engine.kv.prefix_cache import Node, PrefixCache

PS = 4  # page size: small so that tests read easily


def toks(*pages: int | Sequence[int]) -> list[int]:
    """Token ids of whole pages: an int ``t`` stands for the page ``[t, t, t, t]``."""
    out: list[int] = []
    for p in pages:
        out.extend([p] * PS if isinstance(p, int) else p)
    return out


def nodes(cache: PrefixCache) -> list[Node]:
    out, stack = [], [n for root in cache.roots.values() for n in root.children.values()]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children.values())
    return out


def check_tree(cache: PrefixCache) -> None:
    """Structural invariants that every operation must keep."""
    all_pages = [p for n in nodes(cache) for p in n.pages]
    assert len(all_pages) == len(set(all_pages)), "a page is owned by two nodes"
    assert len(all_pages) == cache.num_pages
    assert not any(cache.pool._is_free[p] for p in all_pages), "the tree owns a free page"
    assert cache.evictable_pages == sum(len(n.pages) for n in nodes(cache) if n.lock_ref == 0)
    assert all(root.children for salt, root in cache.roots.items() if salt), "an empty salted root"
    for n in nodes(cache):
        assert n.key and len(n.key) == len(n.pages) * PS
        assert n.parent is not None and n.parent.children[tuple(n.key[:PS])] is n
        assert n.lock_ref >= sum(c.lock_ref for c in n.children.values()), "a lock skipped an ancestor"


def insert_fresh(cache: PrefixCache, token_ids: list[int]) -> tuple[list[int], Node]:
    """What a sequence does: allocate pages for its tokens, then hand them to the tree."""
    pages = cache.pool.alloc(len(token_ids) // PS)
    return cache.insert(token_ids, pages)


@pytest.fixture
def cache() -> PrefixCache:
    return PrefixCache(PagePool(32), PS)


def test_empty_tree_matches_nothing(cache: PrefixCache) -> None:
    pages, node = cache.match_prefix(toks(1, 2))
    assert pages == [] and node is cache.root


def test_insert_then_match_whole_pages_only(cache: PrefixCache) -> None:
    tree_pages, _ = insert_fresh(cache, toks(1, 2, 3))
    assert cache.num_pages == 3 and cache.pool.num_used == 3
    assert cache.match_prefix(toks(1, 2, 3))[0] == tree_pages
    assert cache.match_prefix(toks(1, 2, 3, 4))[0] == tree_pages
    assert cache.match_prefix(toks(1, 2))[0] == tree_pages[:2]
    # a partial last page is never a hit
    assert cache.match_prefix([*toks(1, 2), 3, 3, 3])[0] == tree_pages[:2]
    assert cache.match_prefix([1, 1, 1])[0] == []
    check_tree(cache)


def test_matching_compares_every_token_not_the_first_page_only(cache: PrefixCache) -> None:
    a, _ = insert_fresh(cache, toks(1, 2, 3))
    # same first page, second page differs in its last token only
    pages, _ = cache.match_prefix(toks(1, [2, 2, 2, 9], 3))
    assert pages == a[:1]
    pages, _ = cache.match_prefix(toks([1, 1, 1, 9], 2, 3))
    assert pages == []
    check_tree(cache)


def test_hash_collisions_never_make_a_hit() -> None:
    """Hashes only name blocks for events: a hasher that maps everything to one value changes nothing."""
    cache = PrefixCache(PagePool(16), PS, hasher=lambda parent, key: [7] * (len(key) // PS))
    a, _ = insert_fresh(cache, toks(1, 2))
    b, _ = insert_fresh(cache, toks(5, 6))
    assert set(a).isdisjoint(b) and cache.num_pages == 4
    assert cache.match_prefix(toks(1, 6))[0] == a[:1]
    assert cache.match_prefix(toks(5, 2))[0] == b[:1]
    check_tree(cache)


def test_different_sequences_never_share_pages(cache: PrefixCache) -> None:
    a, _ = insert_fresh(cache, toks(1, 2, 3))
    b, _ = insert_fresh(cache, toks(4, 2, 3))
    assert set(a).isdisjoint(b)
    assert cache.match_prefix(toks(4, 2, 3))[0] == b
    check_tree(cache)


def test_insert_splits_an_edge_at_the_first_differing_page(cache: PrefixCache) -> None:
    a, node_a = insert_fresh(cache, toks(1, 2, 3, 4))
    b, node_b = insert_fresh(cache, toks(1, 2, 7))
    assert b[:2] == a[:2], "the shared pages are the tree's"
    assert cache.num_pages == 5 and cache.pool.num_used == 5, "the duplicate pages went back to the pool"
    # root -> [1,2] -> {[3,4], [7]}
    (upper,) = cache.root.children.values()
    assert upper.key == toks(1, 2) and upper.pages == a[:2]
    assert {tuple(c.key) for c in upper.children.values()} == {tuple(toks(3, 4)), tuple(toks(7))}
    assert node_a.parent is upper and node_b.parent is upper
    assert cache.match_prefix(toks(1, 2, 3, 4))[0] == a
    assert cache.match_prefix(toks(1, 2, 7))[0] == b
    check_tree(cache)


def test_match_splits_so_that_the_returned_node_covers_exactly_the_match(cache: PrefixCache) -> None:
    a, _ = insert_fresh(cache, toks(1, 2, 3, 4))
    pages, node = cache.match_prefix(toks(1, 2, 9))
    assert pages == a[:2] and node.key == toks(1, 2)
    cache.lock(node)  # locks exactly the two matched pages
    assert cache.evictable_pages == 2
    check_tree(cache)
    cache.unlock(node)
    check_tree(cache)


def test_insert_of_cached_content_under_other_pages_dedups(cache: PrefixCache) -> None:
    a, node_a = insert_fresh(cache, toks(1, 2, 3))
    used = cache.pool.num_used
    b, node_b = insert_fresh(cache, toks(1, 2, 3))
    assert b == a and node_b is node_a
    assert cache.pool.num_used == used, "all three duplicates were freed"
    # re-inserting the tree's own pages is a no-op
    c, _ = cache.insert(toks(1, 2, 3), list(a))
    assert c == a and cache.pool.num_used == used
    check_tree(cache)


def test_extending_a_cached_prefix_adds_a_child(cache: PrefixCache) -> None:
    a, node_a = insert_fresh(cache, toks(1, 2))
    # a sequence that already holds the tree's pages for [1,2] computes two more pages
    more = cache.pool.alloc(2)
    b, node_b = cache.insert(toks(1, 2, 3, 4), a + more)
    assert b == a + more and node_b.parent is node_a
    assert cache.num_pages == 4
    check_tree(cache)


def test_lock_protects_the_whole_path_from_eviction(cache: PrefixCache) -> None:
    insert_fresh(cache, toks(1, 2))
    b, node_b = insert_fresh(cache, toks(1, 2, 3))
    insert_fresh(cache, toks(5))
    cache.lock(node_b)
    assert cache.evictable_pages == 1
    assert cache.evict(100) == 1, "only the unlocked leaf [5] can go"
    assert cache.match_prefix(toks(1, 2, 3))[0] == b
    check_tree(cache)
    cache.unlock(node_b)
    assert cache.evictable_pages == cache.num_pages == 3
    assert cache.evict(100) == 3 and cache.pool.num_used == 0
    check_tree(cache)


def test_locks_are_counted(cache: PrefixCache) -> None:
    _, node = insert_fresh(cache, toks(1, 2))
    cache.lock(node)
    cache.lock(node)
    cache.unlock(node)
    assert cache.evict(100) == 0
    cache.unlock(node)
    assert cache.evict(100) == 2
    with pytest.raises(AssertionError):
        cache.unlock(node.parent if node.parent is not cache.root else node)


def test_split_keeps_locks_on_both_halves(cache: PrefixCache) -> None:
    _, node_a = insert_fresh(cache, toks(1, 2, 3))
    cache.lock(node_a)
    insert_fresh(cache, toks(1, 9))  # splits the locked edge after one page
    check_tree(cache)
    assert cache.evictable_pages == 1  # only the new [9]
    assert cache.evict(100) == 1
    cache.unlock(node_a)
    check_tree(cache)
    assert cache.evict(100) == 3 and cache.num_pages == 0


def test_eviction_is_least_recently_used_first(cache: PrefixCache) -> None:
    a, _ = insert_fresh(cache, toks(1))
    _b, _ = insert_fresh(cache, toks(2))
    c, _ = insert_fresh(cache, toks(3))
    cache.match_prefix(toks(1))  # touch a: now b is the oldest
    assert cache.evict(1) == 1
    assert cache.match_prefix(toks(2))[0] == []
    assert cache.match_prefix(toks(1))[0] == a and cache.match_prefix(toks(3))[0] == c
    cache.match_prefix(toks(1))  # now c is the oldest
    assert cache.evict(1) == 1
    assert cache.match_prefix(toks(3))[0] == [] and cache.match_prefix(toks(1))[0] == a
    check_tree(cache)


def test_eviction_frees_leaves_before_their_parents(cache: PrefixCache) -> None:
    insert_fresh(cache, toks(1, 2))
    insert_fresh(cache, toks(1, 3))  # root -> [1] -> {[2], [3]}
    cache.match_prefix(toks(1, 3))
    assert cache.evict(1) == 1  # the older leaf [1,2]'s tail
    assert cache.match_prefix(toks(1, 2))[0] != [] and cache.num_pages == 2
    assert cache.evict(2) == 2  # [3], then [1] once it has become a leaf
    assert cache.num_pages == 0 and cache.pool.num_used == 0
    check_tree(cache)


def test_evict_whole_leaves_may_free_more_than_asked(cache: PrefixCache) -> None:
    insert_fresh(cache, toks(1, 2, 3))
    assert cache.evict(1) == 3
    assert cache.pool.num_free == 32


def test_reset_frees_everything_and_tells_the_listener() -> None:
    events: list[tuple] = []

    class Listener:
        def stored(self, parent_hash, hashes, token_ids, medium):
            events.append(("stored", parent_hash, tuple(hashes), len(token_ids)))

        def removed(self, hashes, medium):
            events.append(("removed", tuple(hashes)))

        def cleared(self):
            events.append(("cleared",))

    def hasher(parent: int | None, key: Sequence[int]) -> list[int]:
        out, h = [], parent or 0
        for i in range(0, len(key), PS):
            h = hash((h, tuple(key[i : i + PS])))
            out.append(h)
        return out

    cache = PrefixCache(PagePool(16), PS, hasher, Listener())
    insert_fresh(cache, toks(1, 2))
    insert_fresh(cache, toks(1, 3))
    stored = [e for e in events if e[0] == "stored"]
    assert [(e[1] is None, len(e[2]), e[3]) for e in stored] == [(True, 2, 8), (False, 1, 4)]
    assert stored[1][1] == stored[0][2][0], "the child chains from the first page's hash"
    cache.reset()
    assert cache.num_pages == 0 and cache.pool.num_free == 16
    removed = {h for e in events if e[0] == "removed" for h in e[1]}
    assert removed == set(stored[0][2]) | set(stored[1][2])
    assert events[-1] == ("cleared",)


def test_reset_refuses_while_locked(cache: PrefixCache) -> None:
    _, node = insert_fresh(cache, toks(1))
    cache.lock(node)
    with pytest.raises(AssertionError):
        cache.reset()


def test_pool_refuses_double_free_and_overdraw() -> None:
    pool = PagePool(3)
    pages = pool.alloc(2)
    with pytest.raises(OutOfPages):
        pool.alloc(2)
    pool.free(pages[:1])
    with pytest.raises(AssertionError):
        pool.free(pages[:1])
    assert pool.num_used == 1


def test_namespaces_never_share_pages_and_hash_from_their_own_root() -> None:
    seeds = {"a": 111, "b": 222}
    stored: list[tuple[int | None, list[int]]] = []

    class Listener:
        def stored(
            self, parent_hash: int | None, hashes: list[int], token_ids: list[int], medium: str | None
        ) -> None:
            stored.append((parent_hash, hashes))

        def removed(self, hashes: list[int], medium: str | None) -> None: ...
        def cleared(self) -> None: ...

    def hasher(parent: int | None, key: Sequence[int]) -> list[int]:
        return [hash((parent, tuple(key[:i]))) for i in range(PS, len(key) + 1, PS)]

    cache = PrefixCache(PagePool(16), PS, hasher, Listener(), namespace_hash=seeds.__getitem__)
    pages, node = cache.insert(toks(1, 2), cache.pool.alloc(2), "a")
    pages_b, node_b = cache.match_prefix(toks(1, 2, 3), "b")
    assert pages_b == [] and node_b.parent is None and "b" not in cache.roots  # a lookup creates nothing
    assert cache.match_prefix(toks(1, 2, 3))[0] == []  # nor the unsalted namespace
    assert cache.match_prefix(toks(1, 2, 3), "a")[0] == pages
    cache.insert(toks(1, 2), cache.pool.alloc(2), "b")
    assert [parent for parent, _ in stored] == [111, 222]  # each chain starts at its namespace's root
    assert stored[0][1] != stored[1][1]
    cache.lock(node)
    assert cache.evict(10) == 2  # only b's pages: a's path is locked
    assert list(cache.roots) == ["", "a"]  # b's root went with its last page
    check_tree(cache)
    cache.unlock(node)
    cache.reset()
    assert cache.pool.num_free == 16 and list(cache.roots) == [""]
