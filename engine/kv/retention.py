"""Retention pins: a prompt's prefix held in the device pool for a while, whatever LRU would evict.

The gateway asks for them (``kv_pin`` on a request: OpenAI's ``prompt_cache_retention``, Anthropic's
``cache_control`` ttl); once the request's prefill is done, ``pin`` holds the prefix cache lock on
the node where the first ``tokens`` of its prompt end (whole pages), so the whole path stays on the
device — never evicted, never demoted to a lower tier — until the pin expires (``expire``, called
by the engine before every step and while idle) or is released.

Bounds, so that no tenant can pin the pool full:
* per namespace (cache salt = tenant): ``max_pages_per_namespace``; a new pin that would pass it
  releases that namespace's oldest pins first (a tenant's newer prefixes win over its older ones);
* overall: ``max_pages``; a new pin that would pass it is refused (``refused`` counts them): other
  tenants' pins are never released to make room, and all pins expire.
A pin is charged its whole length even where it shares pages with another (a chat pinned turn after
turn): a conservative count, so the distinct pages pinned (``pinned_pages``) never exceed the charge.
Pinning a prefix again refreshes its pin (the later expiry wins) and counts it as the newest.

A pin is matched in its request's namespace only, like any prefix hit: it can never hold another
tenant's pages. Only the engine thread may call this (it locks the prefix cache).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine.kv.prefix_cache import Node, PrefixCache


@dataclass
class Pin:
    node: Node  # locked: the deepest node of the pinned prefix (splits keep its identity and its end)
    namespace: str
    pages: int  # charged against the budgets
    expires_at: float


class RetentionPins:
    def __init__(
        self,
        cache: PrefixCache,
        max_pages: int,
        max_pages_per_namespace: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert 0 <= max_pages < max(1, cache.pool.num_pages), "pins must leave room for requests"
        self.cache = cache
        self.max_pages = max_pages
        self.max_pages_per_namespace = min(max_pages_per_namespace, max_pages)
        self.clock = clock
        # namespace -> its pins, oldest first (dicts keep insertion order; a refresh re-inserts)
        self._pins: dict[str, dict[Node, Pin]] = {}
        self._charged: dict[str, int] = {}
        self.charged_pages = 0  # sum of the pins' charges, <= max_pages
        self.pinned_pages = 0  # distinct device pages under a pin, <= charged_pages
        self.refused = 0  # pins refused for the overall budget, since start
        self._next_expiry = float("inf")

    def __len__(self) -> int:
        return sum(len(pins) for pins in self._pins.values())

    def pin(self, token_ids: Sequence[int], namespace: str, ttl_s: float) -> int:
        """Hold the cached prefix of ``token_ids`` (whole pages, at most the namespace's budget) for
        ``ttl_s`` seconds. Returns the pages pinned: 0 when nothing of it is cached or it was refused."""
        ps = self.cache.page_size
        want = min(len(token_ids) // ps, self.max_pages_per_namespace)
        if want <= 0 or ttl_s <= 0:
            return 0
        pages, node = self.cache.match_prefix(token_ids[: want * ps], namespace, count_hit=False)
        if not pages:
            return 0
        now = self.clock()
        expires_at = now + ttl_s
        pins = self._pins.setdefault(namespace, {})
        existing = pins.pop(node, None)
        if existing is not None:  # the same prefix again: refreshed, and now the newest
            existing.expires_at = max(existing.expires_at, expires_at)
            pins[node] = existing
            self._next_expiry = min(self._next_expiry, existing.expires_at)
            return existing.pages
        oldest, freed = [], 0
        for pin in pins.values():  # what the namespace's budget makes room from
            if self._charged.get(namespace, 0) - freed + len(pages) <= self.max_pages_per_namespace:
                break
            oldest.append(pin)
            freed += pin.pages
        if self.charged_pages - freed + len(pages) > self.max_pages:
            self.refused += 1
            if not pins:
                del self._pins[namespace]
            return 0
        for pin in oldest:
            self._release(pin)
        self.cache.lock(node)
        self._pins.setdefault(namespace, {})[node] = Pin(node, namespace, len(pages), expires_at)
        self._charged[namespace] = self._charged.get(namespace, 0) + len(pages)
        self.charged_pages += len(pages)
        self._next_expiry = min(self._next_expiry, expires_at)
        self._count_pinned()
        return len(pages)

    def expire(self) -> int:
        """Release the pins whose time is up; returns how many. Cheap when none is due."""
        now = self.clock()
        if now < self._next_expiry:
            return 0
        due = [pin for pins in self._pins.values() for pin in pins.values() if pin.expires_at <= now]
        for pin in due:
            self._release(pin)
        self._next_expiry = min(
            (pin.expires_at for pins in self._pins.values() for pin in pins.values()), default=float("inf")
        )
        if due:
            self._count_pinned()
        return len(due)

    def release_all(self) -> None:
        """Release every pin (before the cache is flushed)."""
        for pin in [pin for pins in self._pins.values() for pin in pins.values()]:
            self._release(pin)
        self._next_expiry = float("inf")
        self._count_pinned()

    def namespace_pages(self, namespace: str) -> int:
        """The pages charged to ``namespace``'s pins."""
        return self._charged.get(namespace, 0)

    def _release(self, pin: Pin) -> None:
        pins = self._pins[pin.namespace]
        del pins[pin.node]
        if not pins:
            del self._pins[pin.namespace]
        self._charged[pin.namespace] -= pin.pages
        if not self._charged[pin.namespace]:
            del self._charged[pin.namespace]
        self.charged_pages -= pin.pages
        self.cache.unlock(pin.node)

    def _count_pinned(self) -> None:
        """Distinct device pages on pinned paths (pins of one conversation share their start)."""
        seen: set[int] = set()
        total = 0
        for pins in self._pins.values():
            for node in pins:
                while node.parent is not None and id(node) not in seen:
                    seen.add(id(node))
                    total += len(node.pages)
                    node = node.parent
        self.pinned_pages = total
