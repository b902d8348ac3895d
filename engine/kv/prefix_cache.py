"""Radix tree over KV pages: which token prefixes already have their KV in the pool.

Edges are labelled with token ids in whole pages (``page_size`` tokens each), so every node owns
``len(key) // page_size`` pages. Matching compares token ids page by page — a hash is only ever a
name for events, never the test of a hit.

Namespaces: each cache salt (vLLM's ``cache_salt``, the gateway's per-tenant salt) has its own root,
so requests of different tenants never share, nor time, each other's pages. A salted root exists
only while it holds pages: lookups never create one, and eviction drops a root with its last child,
so ``roots`` never outgrows the pool (at most ``num_pages`` salted roots), however many salts come.

Ownership: pages in the tree belong to the tree. A sequence that matched a prefix *locks* the path
(``lock``), which makes those pages unevictable until it ``unlock``s. Eviction removes least
recently used unlocked leaves, so a running request never loses a page it reads.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from typing import Protocol

from engine.kv.page_pool import PagePool

BlockHasher = Callable[[int | None, Sequence[int]], list[int]]
"""(parent block hash or None at the root, token ids of whole pages) -> one chained hash per page."""


class CacheListener(Protocol):
    """Told about every change of the tree's contents, in order (the KV event publisher)."""

    def stored(self, parent_hash: int | None, hashes: list[int], token_ids: list[int]) -> None: ...
    def removed(self, hashes: list[int]) -> None: ...
    def cleared(self) -> None: ...


class Node:
    __slots__ = (
        "children",
        "hashes",
        "key",
        "last_access",
        "lock_ref",
        "namespace",
        "pages",
        "parent",
        "seed",
    )

    def __init__(self, key: list[int], pages: list[int], parent: Node | None, hashes: list[int]) -> None:
        self.key = key
        self.pages = pages
        self.parent = parent
        self.hashes = hashes
        self.children: dict[tuple[int, ...], Node] = {}
        self.lock_ref = 0
        self.last_access = 0
        self.seed: int | None = None  # roots only: the namespace's chain root (None = the hasher's default)
        self.namespace = ""  # roots only: the salt this root is the root of

    @property
    def last_hash(self) -> int | None:
        if self.hashes:
            return self.hashes[-1]
        return self.parent.last_hash if self.parent else self.seed


class PrefixCache:
    def __init__(
        self,
        pool: PagePool,
        page_size: int,
        hasher: BlockHasher | None = None,
        listener: CacheListener | None = None,
        namespace_hash: Callable[[str], int] | None = None,
    ) -> None:
        self.pool = pool
        self.page_size = page_size
        self.hasher = hasher
        self.listener = listener
        self._clock = itertools.count(1)
        self.namespace_hash = namespace_hash  # salt -> chain root hash handed to the hasher
        self.root = Node([], [], None, [])  # the unsalted namespace
        self.roots: dict[str, Node] = {"": self.root}
        self.num_pages = 0  # pages owned by the tree
        self.evictable_pages = 0  # of those, pages on no locked path

    # -- lookup -------------------------------------------------------------------------------------
    def _root(self, namespace: str) -> Node:
        """The namespace's root, created (for an insert) if it holds nothing yet."""
        root = self.roots.get(namespace)
        if root is None:
            root = self.roots[namespace] = Node([], [], None, [])
            root.seed = self.namespace_hash(namespace) if self.namespace_hash else None
            root.namespace = namespace
        return root

    def match_prefix(self, token_ids: Sequence[int], namespace: str = "") -> tuple[list[int], Node]:
        """Longest cached prefix of whole pages. Returns its pages and the node it ends at.

        The node is only safe to use while locked; lock it before anything can evict.
        """
        # An unknown namespace matches nothing: a detached empty root (locking a root is a no-op),
        # so a flood of distinct salts that never cache a page leaves no trace in ``roots``.
        node = self.roots.get(namespace) or Node([], [], None, [])
        ps, pages, i = self.page_size, [], 0
        now = next(self._clock)
        while i + ps <= len(token_ids):
            child = node.children.get(tuple(token_ids[i : i + ps]))
            if child is None:
                break
            matched = self._common_pages(child.key, token_ids, i)
            if matched < len(child.pages):
                child = self._split(child, matched)
            child.last_access = now
            pages.extend(child.pages)
            node, i = child, i + len(child.key)
        return pages, node

    def _common_pages(self, key: list[int], token_ids: Sequence[int], start: int) -> int:
        ps, n = self.page_size, 1  # the first page already matched through the children dict
        while (n + 1) * ps <= len(key) and start + (n + 1) * ps <= len(token_ids):
            if key[n * ps : (n + 1) * ps] != list(token_ids[start + n * ps : start + (n + 1) * ps]):
                break
            n += 1
        return n

    def _split(self, child: Node, num_pages: int) -> Node:
        """Cut ``child`` after ``num_pages`` pages; returns the new upper half. Hashes are chained,
        so splitting never changes a block's hash."""
        cut = num_pages * self.page_size
        parent = child.parent
        assert parent is not None
        upper = Node(child.key[:cut], child.pages[:num_pages], parent, child.hashes[:num_pages])
        upper.lock_ref, upper.last_access = child.lock_ref, child.last_access
        child.key, child.pages, child.hashes = (
            child.key[cut:],
            child.pages[num_pages:],
            child.hashes[num_pages:],
        )
        child.parent = upper
        upper.children[tuple(child.key[: self.page_size])] = child
        parent.children[tuple(upper.key[: self.page_size])] = upper
        return upper

    # -- insertion ----------------------------------------------------------------------------------
    def insert(
        self, token_ids: Sequence[int], pages: list[int], namespace: str = ""
    ) -> tuple[list[int], Node]:
        """Give the tree the pages holding the KV of ``token_ids`` (whole pages only).

        Where the tree already holds some of these pages' content under other page ids, the
        caller's duplicates are freed. Returns the tree's pages for the whole range (the caller
        must use these from now on) and the deepest node, which the caller should lock.
        """
        ps = self.page_size
        assert len(token_ids) == len(pages) * ps, "insert takes whole pages"
        node, i, now, tree_pages = self._root(namespace), 0, next(self._clock), []
        while i < len(pages):
            child = node.children.get(tuple(token_ids[i * ps : (i + 1) * ps]))
            if child is None:
                key = list(token_ids[i * ps :])
                hashes = self.hasher(node.last_hash, key) if self.hasher else []
                child = Node(key, pages[i:], node, hashes)
                child.last_access = now
                node.children[tuple(key[:ps])] = child
                self.num_pages += len(child.pages)
                self.evictable_pages += len(child.pages)
                if self.listener:
                    self.listener.stored(node.last_hash, hashes, key)
                tree_pages.extend(child.pages)
                return tree_pages, child
            matched = self._common_pages(child.key, token_ids, i * ps)
            if matched < len(child.pages):
                child = self._split(child, matched)
            duplicates = [
                mine
                for mine, theirs in zip(pages[i : i + matched], child.pages, strict=True)
                if mine != theirs
            ]
            self.pool.free(duplicates)
            child.last_access = now
            tree_pages.extend(child.pages)
            node, i = child, i + matched
        return tree_pages, node

    # -- locking ------------------------------------------------------------------------------------
    def lock(self, node: Node) -> None:
        while node.parent is not None:  # up to, not including, the namespace root
            if node.lock_ref == 0:
                self.evictable_pages -= len(node.pages)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: Node) -> None:
        while node.parent is not None:
            assert node.lock_ref > 0, "unlock without lock"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_pages += len(node.pages)
            node = node.parent  # type: ignore[assignment]

    # -- eviction -----------------------------------------------------------------------------------
    def evict(self, num_pages: int) -> int:
        """Free at least ``num_pages`` pages from unlocked leaves, oldest first. Returns pages freed
        (fewer if not enough are evictable)."""
        heap = [(n.last_access, id(n), n) for n in self._leaves() if n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_pages:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[tuple(leaf.key[: self.page_size])]
            self.pool.free(leaf.pages)
            freed += len(leaf.pages)
            self.num_pages -= len(leaf.pages)
            self.evictable_pages -= len(leaf.pages)
            if self.listener and leaf.hashes:
                self.listener.removed(leaf.hashes)
            if parent.parent is not None and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
            elif parent.parent is None and not parent.children and parent is not self.root:
                del self.roots[parent.namespace]  # an empty salted root: gone with its last page
        return freed

    def _leaves(self) -> list[Node]:
        leaves, stack = [], [n for root in self.roots.values() for n in root.children.values()]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                leaves.append(node)
        return leaves

    def reset(self) -> None:
        """Drop every cached page. Only valid while nothing is locked."""
        assert self.evictable_pages == self.num_pages, "reset while a request holds cached pages"
        self.evict(self.num_pages)
        assert self.num_pages == 0
        self.roots = {"": self.root}
        if self.listener:
            self.listener.cleared()
