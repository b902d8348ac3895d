"""Stored responses of ``/v1/responses`` (``store: true``): what ``GET``, ``DELETE`` and
``previous_response_id`` read. The gateway owns them, never a worker: any replica (with Redis) and any
worker can continue a chain.

A record is the response object as returned to the client plus ``messages``: the whole conversation up to
and including this response's output, as chat messages, without ``instructions`` (the Responses API does
not carry instructions over a chain). Continuing a chain is ``messages`` + the new input, so the worker
sees, and the router hashes, the full conversation.

Invariants:

* Tenants are apart by construction: records are keyed by (tenant, id); a tenant asking for another's id
  finds nothing (a 404, indistinguishable from an id that never existed).
* Bounded: every record expires ``ttl_s`` after it was written; at most ``max_records`` are kept (the
  oldest dropped first); a record over ``max_record_bytes`` is refused at ``put`` (``False``).
* No method raises because Redis failed: ``RedisResponseStore`` also keeps each record in this process
  and reads that copy when Redis has nothing or is away.
"""

from __future__ import annotations

import hashlib
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from cache.index.redis_store import RedisIndexStore
from cache.index.store import IndexStore


@dataclass(frozen=True)
class ResponseStoreConfig:
    ttl_s: float = 30 * 24 * 3600.0  # OpenAI keeps stored responses for 30 days
    max_records: int = 100_000
    max_record_bytes: int = 8 * 2**20


class ResponseStore(ABC):
    def __init__(self, config: ResponseStoreConfig) -> None:
        self.config = config

    @abstractmethod
    async def put(self, tenant: str, response_id: str, record: dict[str, Any]) -> bool:
        """Store ``record``; False (nothing stored) when it is larger than ``max_record_bytes``."""

    @abstractmethod
    async def get(self, tenant: str, response_id: str) -> dict[str, Any] | None:
        """The tenant's record, or None (never stored, expired, deleted, or another tenant's)."""

    @abstractmethod
    async def delete(self, tenant: str, response_id: str) -> bool:
        """Forget the tenant's record; whether there was one."""


def _key(tenant: str, response_id: str) -> str:
    """A fixed-size key whatever the client sent; the tenant is part of it."""
    return hashlib.sha256(f"{tenant}\0{response_id}".encode()).hexdigest()


class LocalResponseStore(ResponseStore):
    """In process memory; also ``RedisResponseStore``'s fallback."""

    def __init__(self, config: ResponseStoreConfig, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(config)
        self._clock = clock
        self._records: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # key -> (record, expires)

    async def put(self, tenant: str, response_id: str, record: dict[str, Any]) -> bool:
        raw = orjson.dumps(record)
        if len(raw) > self.config.max_record_bytes:
            return False
        self.put_raw(_key(tenant, response_id), raw)
        return True

    def put_raw(self, key: str, raw: bytes) -> None:
        self._records[key] = (raw, self._clock() + self.config.ttl_s)
        self._records.move_to_end(key)
        while len(self._records) > self.config.max_records:
            self._records.popitem(last=False)

    async def get(self, tenant: str, response_id: str) -> dict[str, Any] | None:
        key = _key(tenant, response_id)
        entry = self._records.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._records[key]
            return None
        return orjson.loads(entry[0])

    async def delete(self, tenant: str, response_id: str) -> bool:
        entry = self._records.pop(_key(tenant, response_id), None)
        return entry is not None and entry[1] > self._clock()


class RedisResponseStore(ResponseStore):
    """Shared by replicas through Redis, on the index store's connection (``RedisIndexStore.guard``: a
    failure marks it degraded and reads as None). Keys, under the store's ``key_prefix``:
    ``response:<sha256(tenant, id)>`` strings with a TTL, and ``responses`` a sorted set (key -> written at)
    that enforces ``max_records`` (its own entries for expired keys are trimmed with them)."""

    def __init__(self, config: ResponseStoreConfig, store: RedisIndexStore) -> None:
        super().__init__(config)
        self._store = store
        self._local = LocalResponseStore(config)
        prefix = store.config.key_prefix
        self._k_record, self._k_index = prefix + "response:", prefix + "responses"

    async def put(self, tenant: str, response_id: str, record: dict[str, Any]) -> bool:
        raw = orjson.dumps(record)
        if len(raw) > self.config.max_record_bytes:
            return False
        key = _key(tenant, response_id)
        self._local.put_raw(key, raw)
        client, guard = self._store.client, self._store.guard
        ttl_ms = max(1, int(self.config.ttl_s * 1000))
        await guard(client.set(self._k_record + key, raw, px=ttl_ms))
        await guard(client.zadd(self._k_index, {key: time.time()}))
        excess = await guard(client.zcard(self._k_index))
        if excess is not None and excess > self.config.max_records:
            oldest = await guard(client.zpopmin(self._k_index, excess - self.config.max_records))
            if oldest:
                await guard(client.delete(*(self._k_record + _str(k) for k, _ in oldest)))
        return True

    async def get(self, tenant: str, response_id: str) -> dict[str, Any] | None:
        raw = await self._store.guard(self._store.client.get(self._k_record + _key(tenant, response_id)))
        if raw is None:
            # This replica's copy only while Redis is away: a healthy Redis without the key means another
            # replica deleted it (or it expired), and a local copy must not bring it back.
            return None if self._store.status == "healthy" else await self._local.get(tenant, response_id)
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:  # Redis content is not trusted
            return None
        return record if isinstance(record, dict) else None

    async def delete(self, tenant: str, response_id: str) -> bool:
        key = _key(tenant, response_id)
        local = await self._local.delete(tenant, response_id)
        removed = await self._store.guard(self._store.client.delete(self._k_record + key))
        await self._store.guard(self._store.client.zrem(self._k_index, key))
        return bool(removed) or local


def make_response_store(store: IndexStore, config: ResponseStoreConfig) -> ResponseStore:
    """Beside the index: in Redis when the gateway shares its index there, else in process."""
    if isinstance(store, RedisIndexStore):
        return RedisResponseStore(config, store)
    return LocalResponseStore(config)


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
