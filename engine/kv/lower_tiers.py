"""The tiers under the device pool: a host page pool and an optional disk tier (SGLang's HiCache).

Pure Python over a ``PageMover`` (``engine.kv.transfer.KVTransfer`` moves the tensors). The prefix
cache calls in at four points: a node is inserted (``on_insert``), matched (``on_hit``), evicted from
the device (``demote``), or continues a match below the device (``load_back``).

Write policies (SGLang's names) say when a device node gets its host copy: ``write_through`` at
insert, ``write_through_selective`` at its second hit, ``write_back`` when it is evicted from the
device. A node evicted without a host copy is demoted anyway (never a loss), except under
``write_through_selective`` a node hit fewer than twice with nothing below it: a cold prefix is not
worth host memory, and it is dropped. The disk tier, when there is one, gets every host copy as it
is made (so a restart finds what the host held).

Invariants:
- a node is in at least one tier while it is in the tree; a node held in no tier has no children;
- a host or disk copy is evicted only from a node that is pinned by no load-back, and a node's last
  copy only from a node without children; device pages are never touched here, so a running
  request (which holds device pages) never loses KV;
- every change of a node's tiers is announced to the cache's listener with its medium: a demotion is
  ``removed(GPU)`` plus ``stored(CPU_PINNED)``, never a loss of the block.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable
from typing import Protocol

from cache.planning.load_profile import KVLoadCost
from cache.wire.tiers import MEDIUM_DISK, MEDIUM_HOST
from engine.kv.disk_store import BadPageFile, DiskStore, PageHeader
from engine.kv.load_cost import LoadCost
from engine.kv.page_pool import PagePool
from engine.kv.prefix_cache import Node, PrefixCache

log = logging.getLogger(__name__)


class PageMover(Protocol):
    """Copies page contents between tiers; the cache decides which pages, the mover moves bytes."""

    page_bytes: int  # one page's K and V
    copy_bytes_per_s: float | None  # measured host <-> device bandwidth

    def to_host(self, device_pages: list[int], host_pages: list[int]) -> None: ...
    def to_device(self, host_pages: list[int], device_pages: list[int]) -> None: ...
    def read_page(self, page: int, on_host: bool) -> bytes: ...
    def write_page_to_device(self, page: int, data: bytes) -> None: ...


class LowerTiers:
    def __init__(
        self,
        host_pool: PagePool,
        mover: PageMover,
        write_policy: str,
        cost: LoadCost,
        disk: DiskStore | None = None,
    ) -> None:
        self.host_pool, self.mover, self.write_policy = host_pool, mover, write_policy
        self.cost, self.disk = cost, disk
        self.cache: PrefixCache = None  # type: ignore[assignment]  # set by ``attach``
        self.loaded_tokens = {MEDIUM_HOST: 0, MEDIUM_DISK: 0}  # prompt tokens loaded back, by source
        self.bad_page_files = 0

    def attach(self, cache: PrefixCache) -> None:
        assert cache.hasher is not None or self.disk is None, "page files are named by block hash"
        self.cache = cache

    # -- hooks from the prefix cache ------------------------------------------------------------------
    def on_insert(self, node: Node) -> None:
        if self.write_policy == "write_through":
            self._copy_to_host(node)

    def on_hit(self, node: Node) -> None:
        node.hit_count += 1
        selective = self.write_policy == "write_through_selective"
        if selective and node.hit_count >= 2 and node.host_pages is None:
            self._copy_to_host(node)

    def demote(self, node: Node) -> bool:
        """``node`` leaves the device: copy it down first. True if it stays in a lower tier."""
        if node.host_pages is not None or node.on_disk:
            return True
        cold = self.write_policy == "write_through_selective" and node.hit_count < 2
        if cold and not node.children:
            return False
        if self._copy_to_host(node) or (self.disk is not None and self._write_disk(node, on_host=False)):
            return True
        for child in list(node.children.values()):  # no room anywhere: what hangs below goes too
            self.drop_subtree(child)
        return False

    def load_back(self, node: Node, below: list[Node]) -> bool:
        """Bring ``below`` (a match's continuation under the device node ``node``) to the device, all of
        it or none of it, if copying is estimated cheaper than recomputing. True if loaded."""
        ps, page_bytes = self.cache.page_size, self.mover.page_bytes
        num_pages = sum(len(n.key) // ps for n in below)
        host_pages = sum(len(n.key) // ps for n in below if n.host_pages is not None)
        seconds = self.cost.load_seconds(
            host_pages * page_bytes,
            (num_pages - host_pages) * page_bytes,
            self.mover.copy_bytes_per_s,
            self.disk.read_bytes_per_s if self.disk else None,
        )
        if not self.cost.pays(num_pages * ps, seconds):
            return False
        cache, pool = self.cache, self.cache.pool
        cache.lock(node)
        for n in below:
            n.pinned += 1
        bad: Node | None = None
        try:
            if pool.num_free < num_pages:
                cache.evict(num_pages - pool.num_free)
            if pool.num_free < num_pages:
                return False
            device = pool.alloc(num_pages)
            bad = self._copy_up(below, device)
            if bad is not None:
                pool.free(device)
                return False
            at = 0
            for n in below:
                count = len(n.key) // ps
                source = MEDIUM_HOST if n.host_pages is not None else MEDIUM_DISK
                self.loaded_tokens[source] += count * ps
                cache.give_device_pages(n, device[at : at + count])
                at += count
            return True
        finally:
            for n in below:
                n.pinned -= 1
            cache.unlock(node)
            if bad is not None:
                self.drop_subtree(bad)

    def _copy_up(self, below: list[Node], device: list[int]) -> Node | None:
        """Copy every node's pages into ``device`` (in order); the first node with a bad page file,
        or None when all arrived."""
        at = 0
        for n in below:
            count = len(n.key) // self.cache.page_size
            if n.host_pages is not None:
                self.mover.to_device(n.host_pages, device[at : at + count])
            else:
                assert self.disk is not None and n.on_disk
                try:
                    for i, block_hash in enumerate(n.hashes):
                        _, payload = self.disk.read(block_hash)
                        self.mover.write_page_to_device(device[at + i], payload)
                except BadPageFile as exc:
                    log.warning("KV disk tier: %s; recomputing that prefix", exc)
                    self.bad_page_files += 1
                    return n
            at += count
        return None

    def load_cost(self) -> KVLoadCost:
        """What ``load_back`` weighs, per prompt token (for ``GET /load_profile``)."""
        return self.cost.per_token(
            self.mover.page_bytes / self.cache.page_size,
            self.mover.copy_bytes_per_s,
            self.disk.read_bytes_per_s if self.disk else None,
        )

    # -- copies down ---------------------------------------------------------------------------------
    def _copy_to_host(self, node: Node) -> bool:
        assert node.on_device and node.host_pages is None
        pages = self._alloc(self.host_pool, len(node.pages), self._evict_host)
        if pages is None:
            return False
        self.mover.to_host(node.pages, pages)
        node.host_pages = pages
        self.cache.announce_stored(node, MEDIUM_HOST)
        if self.disk is not None and not node.on_disk:
            self._write_disk(node, on_host=True)
        return True

    def _write_disk(self, node: Node, on_host: bool) -> bool:
        assert self.disk is not None
        count = len(node.hashes)
        if self.disk.capacity_pages - self.disk.num_pages < count:
            self._evict_disk(count - (self.disk.capacity_pages - self.disk.num_pages))
        if self.disk.capacity_pages - self.disk.num_pages < count:
            return False
        pages = node.host_pages if on_host else node.pages
        assert pages is not None
        namespace, ps = node.root.namespace, self.cache.page_size
        parent = node.parent.last_hash if node.parent else None
        for i, block_hash in enumerate(node.hashes):
            tokens = tuple(node.key[i * ps : (i + 1) * ps])
            header = PageHeader(block_hash, parent, namespace, tokens)
            self.disk.write(header, self.mover.read_page(pages[i], on_host))
            parent = block_hash
        node.on_disk = True
        self.cache.announce_stored(node, MEDIUM_DISK)
        return True

    @staticmethod
    def _alloc(pool: PagePool, count: int, evict: Callable[[int], None]) -> list[int] | None:
        if pool.num_free < count:
            evict(count - pool.num_free)
        return pool.alloc(count) if pool.num_free >= count else None

    # -- eviction in the lower tiers -------------------------------------------------------------------
    def _evict_host(self, num_pages: int) -> None:
        self._evict(num_pages, lambda n: n.host_pages is not None, self._drop_host)

    def _evict_disk(self, num_pages: int) -> None:
        self._evict(num_pages, lambda n: n.on_disk, self._drop_disk)

    def _evict(self, num_pages: int, holds: Callable[[Node], bool], drop: Callable[[Node], None]) -> None:
        """Drop copies, least recently used first, from unpinned nodes that keep another copy or have
        no children (whose last copy can go with them)."""

        def evictable(n: Node) -> bool:
            others = n.on_device + (n.host_pages is not None) + n.on_disk - 1
            return holds(n) and not n.pinned and (others > 0 or not n.children)

        order = itertools.count()  # ties broken in tree order: the same run evicts the same way
        heap = [(n.last_access, next(order), n) for n in self.cache.nodes() if evictable(n)]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_pages:
            _, _, node = heapq.heappop(heap)
            if not evictable(node):  # pushed again as a parent while already queued
                continue
            parent = node.parent
            freed += len(node.key) // self.cache.page_size
            drop(node)
            if not (node.on_device or node.host_pages is not None or node.on_disk):
                self.cache.delete(node)
                if parent is not None and parent.parent is not None and evictable(parent):
                    heapq.heappush(heap, (parent.last_access, next(order), parent))

    def _drop_host(self, node: Node) -> None:
        assert node.host_pages is not None
        self.host_pool.free(node.host_pages)
        node.host_pages = None
        self.cache.announce_removed(node, MEDIUM_HOST)

    def _drop_disk(self, node: Node) -> None:
        assert self.disk is not None
        for block_hash in node.hashes:
            self.disk.delete(block_hash)
        node.on_disk = False
        self.cache.announce_removed(node, MEDIUM_DISK)

    def drop_copies(self, node: Node) -> None:
        """Forget ``node``'s lower-tier copies (flush, a bad page file)."""
        if node.host_pages is not None:
            self._drop_host(node)
        if node.on_disk:
            self._drop_disk(node)

    def drop_subtree(self, top: Node) -> None:
        """Take ``top`` (not on the device) and everything below it out of every tier and the tree."""
        stack, order = [top], []
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(node.children.values())
        for node in reversed(order):  # children first
            assert not node.on_device and not node.pinned
            self.drop_copies(node)
            self.cache.delete(node)

    # -- restart --------------------------------------------------------------------------------------
    def restore_from_disk(self) -> int:
        """Rebuild the tree's disk-only nodes from the page files (a restart) and announce them.
        Files whose chain does not hash as this engine hashes (another model, a broken chain) are
        left alone and not counted. Returns the pages restored."""
        assert self.disk is not None and self.cache.hasher is not None
        by_parent: dict[tuple[str, int | None], list[PageHeader]] = {}
        for header in self.disk.scan():
            by_parent.setdefault((header.namespace, header.parent_hash), []).append(header)
        cache, restored, ps = self.cache, 0, self.cache.page_size
        stack: list[tuple[Node, PageHeader]] = []
        for (namespace, parent_hash), headers in by_parent.items():
            seed = cache.namespace_hash(namespace) if namespace and cache.namespace_hash else None
            if parent_hash == seed:  # the first blocks of a namespace
                stack.extend((cache.root_of(namespace), h) for h in headers)
        while stack:
            parent, header = stack.pop()
            key = list(header.token_ids)
            first = tuple(key[:ps])
            if len(key) != ps or first in parent.children:
                continue
            if self.cache.hasher(parent.last_hash, key) != [header.block_hash]:
                continue
            node = Node(key, [], parent, [header.block_hash])
            node.on_disk = True
            parent.children[first] = node
            self.cache.announce_stored(node, MEDIUM_DISK)
            restored += 1
            stack.extend((node, h) for h in by_parent.get((header.namespace, header.block_hash), []))
        for namespace, root in list(cache.roots.items()):
            if namespace and not root.children:
                del cache.roots[namespace]
        self.disk.names = {n.hashes[0] for n in self.cache.nodes() if n.on_disk}
        return restored
