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
recently used unlocked leaves, so a running request never loses a page it reads. A retention pin
(``engine.kv.retention``) is a lock too, held by the pin table until it expires.

Tiers (``LowerTiers``, optional): a node may also, or only, be held in host memory or on disk. A node
on the device (``node.pages`` non-empty) has its whole path on the device, so device eviction takes
unlocked nodes none of whose children are on the device; with lower tiers it demotes them (copy down,
then free the device pages) instead of dropping them. ``match_and_load`` brings a lower-tier
continuation of a match back to the device when that pays. Without lower tiers every node is on the
device and the tree behaves exactly as a single pool.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from engine.kv.page_pool import PagePool

if TYPE_CHECKING:
    from engine.kv.lower_tiers import LowerTiers

BlockHasher = Callable[[int | None, Sequence[int]], list[int]]
"""(parent block hash or None at the root, token ids of whole pages) -> one chained hash per page."""


class CacheListener(Protocol):
    """Told about every change of the tree's contents, in order (the KV event publisher). ``medium``
    names the tier (``cache.wire.tiers``: "GPU", "CPU_PINNED", "DISK"); None is the device of an engine
    without lower tiers (what vLLM sends for its GPU prefix cache)."""

    def stored(
        self, parent_hash: int | None, hashes: list[int], token_ids: list[int], medium: str | None
    ) -> None: ...
    def removed(self, hashes: list[int], medium: str | None) -> None: ...
    def cleared(self) -> None: ...


class Node:
    __slots__ = (
        "children",
        "hashes",
        "hit_count",
        "host_pages",
        "key",
        "last_access",
        "lock_ref",
        "namespace",
        "on_disk",
        "pages",
        "parent",
        "pinned",
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
        # Lower tiers: ``pages`` is empty when the node is not on the device.
        self.host_pages: list[int] | None = None  # host pool pages, when held in host memory
        self.on_disk = False  # one page file per block (named by ``hashes``)
        self.hit_count = 0  # matches that reached this node (write_through_selective copies at 2)
        self.pinned = 0  # > 0 while a load-back reads it: no tier may evict it

    @property
    def on_device(self) -> bool:
        return bool(self.pages)

    @property
    def root(self) -> Node:
        node = self
        while node.parent is not None:
            node = node.parent
        return node

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
        lower: LowerTiers | None = None,
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
        self.lower = lower
        self.device_medium = "GPU" if lower is not None else None  # as events name the device tier
        if lower is not None:
            lower.attach(self)

    def announce_stored(self, node: Node, medium: str | None) -> None:
        if self.listener and node.hashes:
            parent = node.parent.last_hash if node.parent else None
            self.listener.stored(parent, node.hashes, node.key, medium)

    def announce_removed(self, node: Node, medium: str | None) -> None:
        if self.listener and node.hashes:
            self.listener.removed(node.hashes, medium)

    # -- lookup -------------------------------------------------------------------------------------
    def root_of(self, namespace: str) -> Node:
        """The namespace's root, created (for an insert) if it holds nothing yet."""
        root = self.roots.get(namespace)
        if root is None:
            root = self.roots[namespace] = Node([], [], None, [])
            root.seed = self.namespace_hash(namespace) if self.namespace_hash else None
            root.namespace = namespace
        return root

    def match_prefix(
        self, token_ids: Sequence[int], namespace: str = "", count_hit: bool = True
    ) -> tuple[list[int], Node]:
        """Longest cached prefix of whole pages. Returns its pages and the node it ends at (split so
        that it ends where the match does). ``count_hit=False``: a look-up that is no request's hit
        (a retention pin), which the lower tiers' write policy must not count.

        The node is only safe to use while locked; lock it before anything can evict.
        """
        # An unknown namespace matches nothing: a detached empty root (locking a root is a no-op),
        # so a flood of distinct salts that never cache a page leaves no trace in ``roots``.
        node = self.roots.get(namespace) or Node([], [], None, [])
        ps, pages, i = self.page_size, [], 0
        now = next(self._clock)
        while i + ps <= len(token_ids):
            child = node.children.get(tuple(token_ids[i : i + ps]))
            if child is None or not child.on_device:
                break
            matched = self._common_pages(child.key, token_ids, i)
            if matched < len(child.pages):
                child = self._split(child, matched)
            child.last_access = now
            if self.lower is not None and count_hit:
                self.lower.on_hit(child)
            pages.extend(child.pages)
            node, i = child, i + len(child.key)
        return pages, node

    def match_and_load(self, token_ids: Sequence[int], namespace: str = "") -> tuple[list[int], Node]:
        """``match_prefix``, after loading back the match's continuation from the lower tiers when
        that pays (all of it or none of it, ``LowerTiers.load_back``)."""
        pages, node = self.match_prefix(token_ids, namespace)
        if self.lower is None or namespace not in self.roots:
            return pages, node
        below = self._match_below(node, token_ids, len(pages) * self.page_size)
        if below and self.lower.load_back(node, below):
            return self.match_prefix(token_ids, namespace)
        return pages, node

    def _match_below(self, node: Node, token_ids: Sequence[int], start: int) -> list[Node]:
        """The nodes (none on the device) that continue the match of ``token_ids[:start]`` ending at
        ``node``, split so that the last one ends where the match does."""
        ps, chain, i, now = self.page_size, [], start, next(self._clock)
        while i + ps <= len(token_ids):
            child = node.children.get(tuple(token_ids[i : i + ps]))
            if child is None:
                break
            assert not child.on_device, "the device tier is prefix-closed"
            matched = self._common_pages(child.key, token_ids, i)
            if matched < len(child.key) // ps:
                child = self._split(child, matched)
            child.last_access = now
            chain.append(child)
            node, i = child, i + len(child.key)
        return chain

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
        upper.hit_count, upper.on_disk, upper.pinned = child.hit_count, child.on_disk, child.pinned
        child.key, child.pages, child.hashes = (
            child.key[cut:],
            child.pages[num_pages:],
            child.hashes[num_pages:],
        )
        if child.host_pages is not None:
            upper.host_pages, child.host_pages = child.host_pages[:num_pages], child.host_pages[num_pages:]
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
        node, i, now, tree_pages = self.root_of(namespace), 0, next(self._clock), []
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
                self.announce_stored(child, self.device_medium)
                if self.lower is not None:
                    self.lower.on_insert(child)
                tree_pages.extend(child.pages)
                return tree_pages, child
            matched = self._common_pages(child.key, token_ids, i * ps)
            if matched < len(child.key) // ps:
                child = self._split(child, matched)
            if not child.on_device:  # held only in a lower tier: the caller's recompute is its device copy
                self.give_device_pages(child, pages[i : i + matched])
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

    def give_device_pages(self, node: Node, pages: list[int]) -> None:
        """``node`` (whose parent is on the device) is on the device again, in ``pages``."""
        assert not node.on_device and len(pages) * self.page_size == len(node.key)
        node.pages = list(pages)
        self.num_pages += len(pages)
        if node.lock_ref == 0:
            self.evictable_pages += len(pages)
        self.announce_stored(node, self.device_medium)

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
        """Free at least ``num_pages`` device pages from unlocked device leaves, oldest first. Returns
        pages freed (fewer if not enough are evictable). With lower tiers a node is demoted (kept in a
        lower tier) or, if the tiers decline it, dropped; without, it is dropped."""
        order = itertools.count()  # ties broken in tree order, so that runs are reproducible
        heap = [(n.last_access, next(order), n) for n in self._device_leaves() if n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_pages:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            kept = self.lower is not None and self.lower.demote(leaf)  # copies down before the free
            self.pool.free(leaf.pages)
            freed += len(leaf.pages)
            self.num_pages -= len(leaf.pages)
            self.evictable_pages -= len(leaf.pages)
            self.announce_removed(leaf, self.device_medium)
            leaf.pages = []
            if not kept:
                self.delete(leaf)
            if parent.parent is not None and parent.lock_ref == 0 and self._is_device_leaf(parent):
                heapq.heappush(heap, (parent.last_access, next(order), parent))
        return freed

    def delete(self, node: Node) -> None:
        """Take a node held in no tier out of the tree (an empty salted root goes with it)."""
        assert not node.children and not node.on_device and node.host_pages is None and not node.on_disk
        parent = node.parent
        assert parent is not None
        del parent.children[tuple(node.key[: self.page_size])]
        if parent.parent is None and not parent.children and parent is not self.root:
            del self.roots[parent.namespace]

    @staticmethod
    def _is_device_leaf(node: Node) -> bool:
        return node.on_device and not any(c.on_device for c in node.children.values())

    def _device_leaves(self) -> list[Node]:
        leaves, stack = [], [n for root in self.roots.values() for n in root.children.values()]
        while stack:
            node = stack.pop()
            if not node.on_device:
                continue
            on_device = [c for c in node.children.values() if c.on_device]
            if on_device:
                stack.extend(on_device)
            else:
                leaves.append(node)
        return leaves

    def nodes(self) -> list[Node]:
        """Every node of every namespace, parents before children."""
        out, stack = [], [n for root in self.roots.values() for n in root.children.values()]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def reset(self) -> None:
        """Drop every cached page, in every tier. Only valid while nothing is locked."""
        assert self.evictable_pages == self.num_pages, "reset while a request holds cached pages"
        for node in reversed(self.nodes()):  # children first: every removal names a known block
            if node.on_device:
                self.pool.free(node.pages)
                self.announce_removed(node, self.device_medium)
                node.pages = []
            if self.lower is not None:
                self.lower.drop_copies(node)
        self.root.children.clear()
        self.roots = {"": self.root}
        self.num_pages = self.evictable_pages = 0
        if self.listener:
            self.listener.cleared()
