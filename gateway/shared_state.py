"""SharedState: what gateway replicas share besides the index — the worker registry, session pins and
dashboard counters — in process memory (``LocalSharedState``) or in Redis (``RedisSharedState``).

Redis keys, under the store's ``key_prefix``: ``workers`` hash (worker id -> msgpack info), ``counters``
hash, ``pin:<session>`` strings with a TTL. ``RedisSharedState`` borrows ``RedisIndexStore``'s connection
and degraded mode: open and close the index store, not this.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import msgpack

from cache.index.redis_store import RedisIndexStore

MAX_LOCAL_PINS = 100_000  # the least recently pinned beyond this are dropped (a pin is ~200 bytes)


class SharedState(ABC):
    bad_values: int  # backend values skipped because they were not what this code writes

    """Registry, pins and counters. Implementations keep these invariants:

    * No method raises because a backend failed: each falls back to this replica's local copy.
    * ``pinned_worker`` never returns a pin older than the ``ttl_s`` it was set with.
    * Memory is bounded whatever clients send: session keys are fixed-size digests (``Router``), the local
      pin map holds at most ``max_pins`` (least recently pinned dropped first), and values read back
      from the backend that are not what this code wrote (a non-integer counter, undecodable info)
      are skipped and counted in ``bad_values``, never raised.
    * An ``incr`` is never lost: increments the backend missed are kept, included in ``counters``, and
      pushed when it is back, so every replica's ``counters`` converge on the sum of all increments.
    * Workers registered while the backend was away are registered there when it is back.
    """

    @abstractmethod
    async def register_worker(self, worker_id: str, info: dict[str, Any]) -> None: ...

    @abstractmethod
    async def unregister_worker(self, worker_id: str) -> None:
        """Remove from the registry only: forgetting the worker's blocks is an index op (``WorkerGoneOp``)."""

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

    @abstractmethod
    def pin_count(self) -> int:
        """Session pins held in this process (bounded by ``max_pins``)."""


class LocalSharedState(SharedState):
    """One gateway: everything in process memory. Also ``RedisSharedState``'s fallback while degraded."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_pins: int = MAX_LOCAL_PINS) -> None:
        self._clock = clock
        self._max_pins = max_pins
        self._workers: dict[str, dict[str, Any]] = {}
        # session -> (worker, expires_at on self._clock), least recently pinned first
        self._pins: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._counters: Counter[str] = Counter()
        self.bad_values = 0

    async def register_worker(self, worker_id: str, info: dict[str, Any]) -> None:
        self._workers[worker_id] = dict(info)

    async def unregister_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    async def workers(self) -> dict[str, dict[str, Any]]:
        return dict(self._workers)

    async def pin_session(self, session_id: str, worker_id: str, ttl_s: float) -> None:
        self._pins[session_id] = (worker_id, self._clock() + ttl_s)
        self._pins.move_to_end(session_id)
        while len(self._pins) > self._max_pins:  # O(1) per pin: no sweep over the whole map
            self._pins.popitem(last=False)

    def pin_count(self) -> int:
        return len(self._pins)

    async def pinned_worker(self, session_id: str) -> str | None:
        pin = self._pins.get(session_id)
        if pin is None:
            return None
        if pin[1] <= self._clock():
            del self._pins[session_id]
            return None
        return pin[0]

    async def incr(self, counter: str, amount: int = 1) -> None:
        self._counters[counter] += amount

    async def counters(self) -> dict[str, int]:
        return dict(self._counters)


class RedisSharedState(SharedState):
    """Shared by replicas through Redis, on ``store``'s connection; every write is also kept locally, so
    a Redis outage degrades to ``LocalSharedState`` for this replica (and marks ``store`` degraded)."""

    def __init__(self, store: RedisIndexStore) -> None:
        self._store = store
        self._local = LocalSharedState()
        self.bad_values = 0
        self._unpushed: Counter[str] = Counter()  # increments Redis has not acknowledged yet
        self._last_counters: dict[str, int] = {}  # Redis' counters as last read
        prefix = store.config.key_prefix
        self._k_workers, self._k_counters, self._k_pin = (
            prefix + "workers",
            prefix + "counters",
            prefix + "pin:",
        )
        store.on_resync(self._push_local_state)

    async def register_worker(self, worker_id: str, info: dict[str, Any]) -> None:
        await self._local.register_worker(worker_id, info)
        await self._store.guard(self._store.client.hset(self._k_workers, worker_id, msgpack.packb(info)))

    async def unregister_worker(self, worker_id: str) -> None:
        await self._local.unregister_worker(worker_id)
        await self._store.guard(self._store.client.hdel(self._k_workers, worker_id))

    async def workers(self) -> dict[str, dict[str, Any]]:
        raw = await self._store.guard(self._store.client.hgetall(self._k_workers))
        if raw is None:
            return await self._local.workers()
        out = {}
        for key, value in raw.items():
            try:
                info = msgpack.unpackb(value)
            except Exception:  # msgpack raises several types; Redis content is not trusted
                info = None
            if isinstance(info, dict):
                out[_str(key)] = info
            else:
                self.bad_values += 1
        return out

    async def pin_session(self, session_id: str, worker_id: str, ttl_s: float) -> None:
        await self._local.pin_session(session_id, worker_id, ttl_s)  # the fallback while degraded
        ttl_ms = max(1, int(ttl_s * 1000))
        await self._store.guard(self._store.client.set(self._k_pin + session_id, worker_id, px=ttl_ms))

    async def pinned_worker(self, session_id: str) -> str | None:
        value = await self._store.guard(self._store.client.get(self._k_pin + session_id))
        return _str(value) if value is not None else await self._local.pinned_worker(session_id)

    def pin_count(self) -> int:
        return self._local.pin_count()

    async def incr(self, counter: str, amount: int = 1) -> None:
        await self._local.incr(counter, amount)
        if await self._store.guard(self._store.client.hincrby(self._k_counters, counter, amount)) is None:
            self._unpushed[counter] += amount

    async def counters(self) -> dict[str, int]:
        raw = await self._store.guard(self._store.client.hgetall(self._k_counters))
        if raw is not None:
            self._last_counters = {}
            for key, value in raw.items():
                try:
                    self._last_counters[_str(key)] = int(value)
                except ValueError:  # HINCRBY wrote every value we read: someone else wrote this one
                    self.bad_values += 1
        merged = Counter(self._last_counters)
        merged.update(self._unpushed)
        return dict(merged)

    async def _push_local_state(self) -> None:
        """On re-sync: register this replica's workers again and push the increments Redis missed.
        Raises on a Redis error (the store retries the sync); an increment is forgotten only once acked."""
        client = self._store.client
        for worker_id, info in (await self._local.workers()).items():
            await client.hset(self._k_workers, worker_id, msgpack.packb(info))
        for counter, amount in list(self._unpushed.items()):
            await client.hincrby(self._k_counters, counter, amount)
            self._unpushed[counter] -= amount  # an incr that failed meanwhile added to it: keep that part
            if not self._unpushed[counter]:
                del self._unpushed[counter]


def _str(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
