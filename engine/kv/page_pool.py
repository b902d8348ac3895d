"""Page accounting for the KV pool: which pages are free. Pure Python, no tensors."""

from __future__ import annotations

from collections import deque


class OutOfPages(RuntimeError):
    pass


class PagePool:
    """A free list of page ids ``0 .. num_pages-1`` of one memory tier.

    Invariant: every page is either free (in the list exactly once) or owned by exactly one holder —
    a running sequence or the prefix cache. ``free`` of a page that is already free is a bug and raises.
    """

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._is_free = bytearray(b"\x01") * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(n)]
        for p in pages:
            self._is_free[p] = 0
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if self._is_free[p]:
                raise AssertionError(f"page {p} freed twice")
            self._is_free[p] = 1
            self._free.append(p)
