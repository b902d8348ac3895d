"""IndexStore: the gateway's shared cache state behind one small interface, and its in-process implementation.

The state is: the index log (every index mutation, applied to this replica's in-memory RadixIndex), the
worker registry, session pins and dashboard counters. ``LocalIndexStore`` keeps all of it in this process
(one gateway, the default); ``cache.index.redis_store.RedisIndexStore`` shares it between gateway replicas.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from cache.index.ops import IndexOp, WorkerGoneOp, apply_op
from cache.index.radix_index import MatchResult, RadixIndex, RadixIndexConfig

StoreStatus = Literal["healthy", "degraded"]


class IndexStore(ABC):
    """Shared gateway state. Implementations keep these invariants:

    * ``index`` is this replica's materialised view of the log. ``match`` does no I/O and never raises.
      The object behind ``index`` may be replaced (snapshot load): do not keep a reference to it.
    * ``append`` applies the op to the local index before it returns, so this replica routes on its own
      writes at once; replication to other replicas may happen later (buffered while the backend is down).
    * Replicas that applied the same log agree on ``match`` for every query (LRU eviction aside: each
      replica evicts on its own when over ``max_blocks``).
    * No method raises because the backend failed: it falls back to local state and ``status`` becomes
      "degraded" until the backend is back and this replica has caught up.
    """

    @property
    @abstractmethod
    def index(self) -> RadixIndex: ...

    @property
    @abstractmethod
    def status(self) -> StoreStatus: ...

    async def start(self) -> None:
        """Connect and catch up (never raises; a down backend just starts "degraded")."""
        return None

    async def close(self) -> None:
        """Flush what can be flushed and release resources."""
        return None

    def match(self, hashes: Sequence[int]) -> dict[str, MatchResult]:
        return self.index.match(hashes)

    @abstractmethod
    async def append_many(self, ops: Iterable[IndexOp]) -> None:
        """Apply ``ops`` locally, in order, and log them for the other replicas."""

    async def append(self, op: IndexOp) -> None:
        await self.append_many((op,))

    @abstractmethod
    async def register_worker(self, worker_id: str, info: dict[str, Any]) -> None: ...

    @abstractmethod
    async def unregister_worker(self, worker_id: str) -> None:
        """Remove from the registry and log a WorkerGoneOp, so every replica forgets its blocks."""

    @abstractmethod
    async def workers(self) -> dict[str, dict[str, Any]]: ...

    @abstractmethod
    async def pin_session(self, session_id: str, worker_id: str, ttl_s: float) -> None: ...

    @abstractmethod
    async def pinned_worker(self, session_id: str) -> str | None:
        """The worker ``session_id`` was pinned to, if the pin has not expired."""

    @abstractmethod
    async def incr(self, counter: str, amount: int = 1) -> None: ...

    @abstractmethod
    async def counters(self) -> dict[str, int]: ...


class LocalState:
    """Registry, pins and counters in process memory; also the Redis store's fallback while degraded."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.workers: dict[str, dict[str, Any]] = {}
        self.pins: dict[str, tuple[str, float]] = {}  # session -> (worker, expires_at on self._clock)
        self.counters: Counter[str] = Counter()

    def pin(self, session_id: str, worker_id: str, ttl_s: float) -> None:
        now = self._clock()
        if len(self.pins) > 10_000:  # bounded: sweep expired pins now and then rather than per call
            self.pins = {s: p for s, p in self.pins.items() if p[1] > now}
        self.pins[session_id] = (worker_id, now + ttl_s)

    def pinned(self, session_id: str) -> str | None:
        pin = self.pins.get(session_id)
        if pin is None:
            return None
        if pin[1] <= self._clock():
            del self.pins[session_id]
            return None
        return pin[0]


class LocalIndexStore(IndexStore):
    """Single-gateway store: everything in this process, always healthy."""

    def __init__(
        self, config: RadixIndexConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._index = RadixIndex(config)
        self._state = LocalState(clock)

    @property
    def index(self) -> RadixIndex:
        return self._index

    @property
    def status(self) -> StoreStatus:
        return "healthy"

    async def append_many(self, ops: Iterable[IndexOp]) -> None:
        for op in ops:
            apply_op(self._index, op)

    async def register_worker(self, worker_id: str, info: dict[str, Any]) -> None:
        self._state.workers[worker_id] = dict(info)

    async def unregister_worker(self, worker_id: str) -> None:
        self._state.workers.pop(worker_id, None)
        await self.append(WorkerGoneOp(worker_id))

    async def workers(self) -> dict[str, dict[str, Any]]:
        return dict(self._state.workers)

    async def pin_session(self, session_id: str, worker_id: str, ttl_s: float) -> None:
        self._state.pin(session_id, worker_id, ttl_s)

    async def pinned_worker(self, session_id: str) -> str | None:
        return self._state.pinned(session_id)

    async def incr(self, counter: str, amount: int = 1) -> None:
        self._state.counters[counter] += amount

    async def counters(self) -> dict[str, int]:
        return dict(self._state.counters)
