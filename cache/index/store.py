"""IndexStore: the gateway's routing index and its replicated log behind one small interface, and its
in-process implementation.

``LocalIndexStore`` keeps the index in this process (one gateway, the default);
``cache.index.redis_store.RedisIndexStore`` shares its log between gateway replicas. The gateway's other
shared state (worker registry, session pins, dashboard counters) is not index state: it lives in
``gateway.shared_state``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

from cache.index.ops import IndexOp, apply_op
from cache.index.radix_index import MatchResult, RadixIndex, RadixIndexConfig

StoreStatus = Literal["healthy", "degraded"]


class IndexStore(ABC):
    """The routing index as a replicated log. Implementations keep these invariants:

    * ``index`` is this replica's materialised view of the log. ``match`` does no I/O and never raises.
      The object behind ``index`` may be replaced (snapshot load): do not keep a reference to it.
    * ``append`` applies the op to the local index before it returns, so this replica routes on its own
      writes at once; replication to other replicas may happen later (buffered while the backend is down).
    * Replicas that applied the same log agree on ``match`` for every query (LRU eviction aside: each
      replica evicts on its own when over ``max_blocks``).
    * No method raises because the backend failed: it keeps serving from the local index and ``status``
      is "degraded" until the backend is back and this replica has caught up.
    """

    @property
    @abstractmethod
    def index(self) -> RadixIndex: ...

    @property
    @abstractmethod
    def status(self) -> StoreStatus: ...

    @property
    def errors(self) -> Mapping[str, int]:
        """Cumulative counts of backend content that failed validation, by kind (for metrics)."""
        return {}

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


class LocalIndexStore(IndexStore):
    """Single-gateway store: the index in this process, always healthy."""

    def __init__(self, config: RadixIndexConfig | None = None) -> None:
        self._index = RadixIndex(config)

    @property
    def index(self) -> RadixIndex:
        return self._index

    @property
    def status(self) -> StoreStatus:
        return "healthy"

    async def append_many(self, ops: Iterable[IndexOp]) -> None:
        for op in ops:
            apply_op(self._index, op)
