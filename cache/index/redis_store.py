"""RedisIndexStore: gateway replicas share the index log in Redis.

Keys (under ``key_prefix`` + ``{index:v<hash format>.<snapshot format>}:``, so replicas of versions that
name blocks differently never share a log, and a Redis Cluster keeps them all on the slot of that hash
tag): ``log`` Stream of index ops (field ``op`` = ``cache.index.ops``
msgpack); ``epoch`` token of the current Redis "generation"; ``snapshot`` msgpack ``{epoch, covered, index}``
where ``covered`` is the last stream id folded into the index; ``snapshot:covered``; ``log:trimmed`` (the
MINID the log was last trimmed to); ``snapshot:lock``. The gateway keeps its other shared state (registry,
pins, counters) on this store's connection, under ``key_prefix`` (``gateway.shared_state``).

Protocol:
* Every replica applies each op locally at once (``append``), queues it, and XADDs the queue in order;
  a tail task XREADs the log from the last applied id and applies everything, its own ops included.
  Ops are bit assignments, so the replay after the optimistic apply lands every replica on the state of
  "the log in stream order" (see ``cache.index.ops``).
* Snapshots: a replica that holds ``snapshot:lock`` writes its index with the id it covers, then trims the
  log to the *previous* snapshot's id, so a slightly lagging replica still finds its next entry. A replica
  whose last id is below ``log:trimmed``, or that starts fresh, loads the snapshot and tails from there.
* Redis loss: ``epoch`` missing means Redis came back empty. The first replica to SET NX a new epoch seeds
  it with a snapshot of its own index; the others load that snapshot (their queued ops follow in the log).
* Any Redis error: the replica keeps serving from its local index, ``status`` is "degraded", and the tail
  task retries until it has re-synced; then it runs the ``on_resync`` callbacks (state that other
  components kept locally while Redis was away goes back). Nothing raises into callers.
* Redis content is not trusted: a log entry that does not decode to a well-typed op is skipped and
  counted (``errors["bad_log_entries"]``), so it never reaches the index (nor, through it, a snapshot);
  a snapshot that does not load is reported as corrupt (``last_error``, ``errors["corrupt_snapshots"]``).
  Retries back off exponentially (``retry_interval_s`` doubling up to ``max_retry_interval_s``) while the
  failures go on, so a corrupt snapshot is not downloaded again four times a second forever.
* Redis Sentinel (``redis+sentinel://`` URLs, ``redis_client``): the connections ask the sentinels for the
  current master; on a failover the commands in flight fail (the store goes degraded, as for any outage),
  the next connection finds the promoted replica, and the tail task re-syncs (an empty master is seeded as
  after a Redis loss). Ops acknowledged by the old master but not yet replicated are lost with it: the
  index then under-reports until workers store those blocks again, which only costs hits.
* Redis Cluster (``redis+cluster://`` URLs): the index keys share one hash tag, so the snapshot's MULTI
  (snapshot, covered, trim, trimmed) and every other multi-key command stay on one slot; the gateway's
  other keys are single-key commands, spread over the slots. A failover is handled as with Sentinel: the
  commands in flight fail, the store goes degraded, and the client's next command reloads the slot map and
  finds the promoted replica (the tail task reads on a fresh client after a failed round: ``_renew_tail``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Any, NoReturn, TypeVar

import msgpack
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.crc import key_slot

from cache.index.ops import IndexOp, apply_op, decode_op, encode_op
from cache.index.radix_index import RadixIndex, RadixIndexConfig
from cache.index.snapshot import SNAPSHOT_VERSION, dump_index, load_index
from cache.index.store import IndexStore, StoreStatus
from cache.wire.hashing import FORMAT_VERSION

logger = logging.getLogger(__name__)
T = TypeVar("T")


def index_key_prefix(key_prefix: str) -> str:
    """Where the index log and snapshot live: versioned by hash and snapshot format, and inside one hash
    tag (``{...}``) so that a Redis Cluster keeps them on one slot, as its MULTI needs."""
    return f"{key_prefix}{{index:v{FORMAT_VERSION}.{SNAPSHOT_VERSION}}}:"


@dataclass(frozen=True)
class RedisStoreConfig:
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "prefixgate:"
    op_timeout_s: float = 0.5  # per command; a slower Redis counts as down
    poll_block_ms: int = 100
    read_batch: int = 1000
    snapshot_every_ops: int = 50_000
    snapshot_interval_s: float = 300.0
    max_pending_ops: int = 100_000  # ops queued while Redis is down; beyond this the oldest are dropped
    retry_interval_s: float = 0.25
    max_retry_interval_s: float = 10.0


SENTINEL_SCHEME = "redis+sentinel://"
SENTINEL_PORT = 26379
CLUSTER_SCHEME = "redis+cluster://"
CLUSTER_PORT = 6379

RedisClient = Redis | RedisCluster  # what the store and its neighbours (``client``) talk to


def redis_client(url: str, **options: Any) -> RedisClient:
    """A client for ``url``: anything ``Redis.from_url`` takes (``redis://``, ``rediss://``, ``unix://``);
    ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]``: the master the
    sentinels name ``service`` (the password is the data nodes'; the sentinels are asked without one); or
    ``redis+cluster://[[user]:password@]host[:port][,host[:port]...]``: a Redis Cluster, found from any of
    those nodes (one reachable seed is enough; the client learns the rest and follows slot moves)."""
    if url.startswith(SENTINEL_SCHEME):
        return _sentinel_client(url, **options)
    if url.startswith(CLUSTER_SCHEME):
        return _cluster_client(url, **options)
    return Redis.from_url(url, **options)


def _split_url(
    url: str, scheme: str, default_port: int
) -> tuple[dict[str, str | None], list[tuple[str, int]], str]:
    """``scheme[[user]:password@]host[:port][,...][/path]`` as (credentials, [(host, port)], path)."""
    netloc, _, path = url[len(scheme) :].partition("/")
    credentials, _, hosts = netloc.rpartition("@")
    username, _, password = credentials.partition(":") if ":" in credentials else ("", "", credentials)
    nodes = []
    for entry in hosts.split(",") if hosts else ():
        host, sep, port = entry.rpartition(":")
        if not sep or not port.isdigit() or (host.count(":") and not host.endswith("]")):
            host, port = entry, str(default_port)  # no port (a bare IPv6 address has colons too)
        nodes.append((host.strip("[]"), int(port)))
    return {"username": username or None, "password": password or None}, nodes, path.strip("/")


def _sentinel_client(url: str, **options: Any) -> Redis:
    auth, sentinels, path = _split_url(url, SENTINEL_SCHEME, SENTINEL_PORT)
    service, _, db = path.partition("/")
    if not sentinels or not service or (db and not db.isdigit()):
        raise ValueError(f"{url!r}: expected {SENTINEL_SCHEME}host[:port][,host[:port]...]/service[/db]")
    timeouts = {k: v for k, v in options.items() if k in ("socket_timeout", "socket_connect_timeout")}
    sentinel = Sentinel(sentinels, sentinel_kwargs=timeouts, db=int(db or 0), **auth, **options)
    return sentinel.master_for(service, redis_class=Redis)


def _cluster_client(url: str, **options: Any) -> RedisCluster:
    auth, seeds, path = _split_url(url, CLUSTER_SCHEME, CLUSTER_PORT)
    if not seeds or path not in ("", "0"):  # a cluster has only database 0
        raise ValueError(f"{url!r}: expected {CLUSTER_SCHEME}host[:port][,host[:port]...]")
    return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in seeds], **auth, **options)


class _NotReady(Exception):
    """Redis is up but another replica has not finished seeding it yet; retry shortly."""


class CorruptSnapshot(Exception):
    """The snapshot in Redis does not load; an operator should delete it (or the whole key prefix)."""


def _stream_id(value: str) -> tuple[int, int]:
    """``"<ms>-<seq>"`` as a pair; ValueError for anything else (Redis content is not trusted)."""
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def _id_lt(a: str, b: str) -> bool:
    return _stream_id(a) < _stream_id(b)


def _s(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class RedisIndexStore(IndexStore):
    def __init__(
        self,
        config: RedisStoreConfig,
        index_config: RadixIndexConfig | None = None,
        replica_id: str | None = None,
    ) -> None:
        self.config = config
        self.replica_id = replica_id or uuid.uuid4().hex[:12]
        self._index_config = index_config
        self._index = RadixIndex(index_config)
        ix = index_key_prefix(config.key_prefix)
        self._k_log, self._k_epoch, self._k_snapshot = ix + "log", ix + "epoch", ix + "snapshot"
        self._k_covered, self._k_trimmed, self._k_lock = (
            ix + "snapshot:covered",
            ix + "log:trimmed",
            ix + "snapshot:lock",
        )
        index_keys = (self._k_log, self._k_epoch, self._k_snapshot, self._k_covered, self._k_trimmed)
        if len({key_slot(k.encode()) for k in index_keys}) != 1:  # a "{}" in the prefix voids the tag
            raise ValueError(f"key prefix {config.key_prefix!r} splits the index over Redis Cluster slots")
        no_retry = Retry(NoBackoff(), 0)  # fail fast: the caller's fallback is better than a stall
        timeout = config.op_timeout_s
        self._redis = redis_client(
            config.url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=no_retry
        )
        self._tail = self._tail_client()
        self._pending: deque[bytes] = deque()  # encoded ops applied locally, not yet in the log, in order
        self._flusher: asyncio.Task | None = None  # writes _pending to the log (``_kick_flush``)
        self._resync_callbacks: list[Callable[[], Awaitable[None]]] = []
        self._flush_lock = asyncio.Lock()
        self._epoch: str | None = None
        self._last_id = "0-0"
        self._synced = False
        self._stopping = False  # set by close(): the tail loop ends after its current XREAD
        self._task: asyncio.Task[None] | None = None
        self._ops_since_snapshot = 0
        self._last_snapshot_at = time.monotonic()
        self.last_error: str | None = "not started"
        self._outage_logged = False
        self.dropped_ops = 0
        self._errors: dict[str, int] = {"bad_log_entries": 0, "corrupt_snapshots": 0}
        self._failures = 0  # consecutive failed rounds of the tail loop: the retry backoff

    # ---- IndexStore ------------------------------------------------------------------------------------
    @property
    def index(self) -> RadixIndex:
        return self._index

    @property
    def status(self) -> StoreStatus:
        return "healthy" if self._synced else "degraded"

    @property
    def errors(self) -> dict[str, int]:
        return dict(self._errors)

    @property
    def retry_delay_s(self) -> float:
        """How long the tail loop waits before its next attempt after a failure (backs off while they last)."""
        cfg = self.config
        return min(cfg.max_retry_interval_s, cfg.retry_interval_s * 2 ** max(0, self._failures - 1))

    @property
    def last_applied_id(self) -> str:
        return self._last_id

    async def start(self) -> None:
        with contextlib.suppress(Exception):  # a failure here is recorded by _degrade and retried by _run
            await self.guard(self._sync())
        self._task = asyncio.create_task(self._run(), name=f"redis-index-tail-{self.replica_id}")

    async def close(self) -> None:
        if self._task is not None:
            # Stop the tail loop by flag and let its current (short, blocking) XREAD return: cancelling
            # inside redis-py's read can be swallowed (redis/redis-py#2028), which hung shutdowns.
            self._stopping = True
            grace = self.config.poll_block_ms / 1000 + self.config.op_timeout_s + 1.0
            done, _ = await asyncio.wait({self._task}, timeout=grace)
            if not done:
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=grace)
        if self._flusher is not None:
            await asyncio.wait({self._flusher})
        if self._synced:
            await self.guard(self._flush())
        for client in (self._redis, self._tail):
            with contextlib.suppress(Exception):
                await client.aclose()

    async def append_many(self, ops: Iterable[IndexOp]) -> None:
        for op in ops:
            apply_op(self._index, op)
            self._pending.append(encode_op(op))
        while len(self._pending) > self.config.max_pending_ops:
            self._pending.popleft()
            self.dropped_ops += 1  # other replicas will miss this op: their views may differ until cleared
        self._kick_flush()

    def _kick_flush(self) -> None:
        """Write the queued ops to the log in the background: a request never waits on Redis (its ops are
        in this replica's index already). Appends that arrive during a write join the next pipeline; a
        write that fails leaves them queued (the store goes degraded and the resync writes them)."""
        if self._synced and self._pending and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.create_task(self.guard(self._flush()))
            self._flusher.add_done_callback(lambda _: self._kick_flush())  # ops queued as it finished

    # ---- for components that keep their own state on this connection (``gateway.shared_state``) ------
    @property
    def client(self) -> RedisClient:
        """The command connection: fail-fast (``op_timeout_s``, no retries). Prefer ``guard`` around calls."""
        return self._redis

    async def guard(self, awaitable: Awaitable[T]) -> T | None:
        """Await a Redis call; on failure log, mark the store degraded (the tail task then re-syncs) and
        return None instead of raising. Cancellation still propagates."""
        try:
            return await awaitable
        except asyncio.CancelledError:
            raise
        except _NotReady:
            return None
        except Exception as exc:
            self._degrade(exc)
            return None

    def on_resync(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` each time this store (re)connects and has caught up, before it reports
        "healthy": the place to push what was kept locally while Redis was away. A callback uses
        ``client`` directly and may raise: the sync then counts as failed and is retried, so it must push
        only what Redis has not acknowledged yet (and keep it until acknowledged)."""
        self._resync_callbacks.append(callback)

    # ---- replication -----------------------------------------------------------------------------------
    async def caught_up(self) -> bool:
        """True when healthy, nothing is queued, and every op in the log has been applied here."""
        if not self._synced or self._pending:
            return False
        last = await self.guard(self._redis.xrevrange(self._k_log, "+", "-", count=1))
        if last is None:
            return False
        return not last or _s(last[0][0]) == self._last_id

    async def write_snapshot(self) -> bool:
        """Write a snapshot of this replica's index now (if healthy); returns whether it was written."""
        if not self._synced:
            return False
        return bool(await self.guard(self._write_snapshot()))

    async def _run(self) -> None:
        while not self._stopping:
            try:
                if not self._synced:
                    await self._sync()
                epoch, trimmed = (
                    await self._redis.pipeline(transaction=False)
                    .get(self._k_epoch)
                    .get(self._k_trimmed)
                    .execute()
                )
                if _s(epoch) != self._epoch or (trimmed is not None and _id_lt(self._last_id, _s(trimmed))):  # type: ignore[arg-type]
                    self._synced = False  # Redis lost its data, or the log was trimmed past us
                    continue
                if self._pending:
                    await self._flush()
                reply = await self._tail.xread(
                    {self._k_log: self._last_id},
                    count=self.config.read_batch,
                    block=self.config.poll_block_ms,
                )
                for _stream, entries in reply or ():
                    for entry_id, fields in entries:
                        self._apply_entry(_s(entry_id), fields)  # type: ignore[arg-type]
                await self._maybe_snapshot()
                self._failures = 0
            except asyncio.CancelledError:
                raise
            except _NotReady:
                await asyncio.sleep(self.config.retry_interval_s)
            except Exception as exc:
                self._failures += 1
                self._degrade(exc)
                if isinstance(self._tail, RedisCluster):
                    await self._renew_tail()
                await asyncio.sleep(self.retry_delay_s)

    def _tail_client(self) -> RedisClient:
        """The tail task's connection: its socket timeout leaves room for XREAD's block."""
        cfg = self.config
        return redis_client(
            cfg.url,
            socket_timeout=cfg.op_timeout_s + cfg.poll_block_ms / 1000,
            socket_connect_timeout=cfg.op_timeout_s,
            retry=Retry(NoBackoff(), 0),
        )

    async def _renew_tail(self) -> None:
        """Redis Cluster: the next round reads on a fresh client. redis-py's cluster client asks one node
        which slot an XREAD goes to (its keys are "movable"), before its own error handling; when that
        node died in a failover, every XREAD failed on it and the client never re-learned the topology
        (seen with redis-py 8.1, in about one failover in ten). A fresh client maps the slots again from
        whichever seed answers."""
        old, self._tail = self._tail, self._tail_client()
        with contextlib.suppress(Exception):
            await old.aclose()

    def _apply_entry(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        self._last_id = entry_id
        self._ops_since_snapshot += 1
        try:
            op = decode_op(fields[b"op"])
        except (KeyError, ValueError, TypeError) as exc:
            self._errors["bad_log_entries"] += 1
            logger.warning("skipping malformed index log entry %s: %s", entry_id, exc)
            return
        apply_op(self._index, op)

    async def _sync(self) -> None:
        r = self._redis
        epoch = _s(await r.get(self._k_epoch))
        if epoch is None:
            token = uuid.uuid4().hex
            if await r.set(self._k_epoch, token, nx=True):
                # Redis is empty (first start, or it lost its data): seed it from this replica's index.
                last = await r.xrevrange(self._k_log, "+", "-", count=1)
                self._epoch, self._last_id = token, _s(last[0][0]) if last else "0-0"  # type: ignore[assignment]
                await r.delete(self._k_covered, self._k_trimmed)
                await self._write_snapshot()
                logger.info("replica %s seeded Redis index state (epoch %s)", self.replica_id, token)
                await self._finish_sync()
                return
            epoch = _s(await r.get(self._k_epoch))
        trimmed = _s(await r.get(self._k_trimmed))
        if epoch != self._epoch or (trimmed is not None and _id_lt(self._last_id, trimmed)):
            await self._load_snapshot(epoch)  # type: ignore[arg-type]
        await self._finish_sync()

    async def _finish_sync(self) -> None:
        await self._flush()
        for callback in self._resync_callbacks:
            await callback()
        if self._outage_logged:
            logger.info("replica %s: Redis available again, caught up at %s", self.replica_id, self._last_id)
        self._synced, self.last_error, self._outage_logged = True, None, False

    async def _load_snapshot(self, epoch: str) -> None:
        blob = await self._redis.get(self._k_snapshot)
        if blob is None:
            raise _NotReady("no snapshot yet")
        try:
            meta = msgpack.unpackb(blob, raw=False)
            snapshot_epoch, covered, dumped = meta["epoch"], meta["covered"], meta["index"]
            if not isinstance(covered, str) or not isinstance(dumped, bytes):
                raise ValueError("covered must be a stream id, index bytes")
            _stream_id(covered)
        except Exception as exc:
            self._corrupt_snapshot(exc)
        if snapshot_epoch != epoch:
            raise _NotReady("snapshot from an older epoch")
        try:
            index = load_index(dumped, self._index_config)
        except Exception as exc:
            self._corrupt_snapshot(exc)
        # Ops this replica queued but never logged stay queued; they are re-applied when read back.
        self._index = index
        self._epoch, self._last_id = epoch, covered
        self._ops_since_snapshot = 0
        logger.info(
            "replica %s loaded snapshot covering %s (%d blocks)",
            self.replica_id,
            self._last_id,
            len(self._index),
        )

    def _corrupt_snapshot(self, exc: Exception) -> NoReturn:
        self._errors["corrupt_snapshots"] += 1
        raise CorruptSnapshot(
            f"the index snapshot in Redis ({self._k_snapshot}) is corrupt ({type(exc).__name__}: {exc}); "
            "delete it so that a replica writes a new one"
        ) from exc

    async def _write_snapshot(self) -> bool:
        r = self._redis
        previous = _s(await r.get(self._k_covered))
        if previous is not None and _id_lt(self._last_id, previous):
            return False  # someone already snapshotted further than this replica has read
        blob = msgpack.packb(
            {"epoch": self._epoch, "covered": self._last_id, "index": dump_index(self._index)}
        )
        pipe = r.pipeline(transaction=True)
        pipe.set(self._k_snapshot, blob).set(self._k_covered, self._last_id)
        if previous is not None and previous != "0-0":
            pipe.xtrim(self._k_log, minid=previous, approximate=False).set(self._k_trimmed, previous)
        await pipe.execute()
        self._ops_since_snapshot, self._last_snapshot_at = 0, time.monotonic()
        return True

    async def _maybe_snapshot(self) -> None:
        due = self._ops_since_snapshot >= self.config.snapshot_every_ops or (
            self._ops_since_snapshot
            and time.monotonic() - self._last_snapshot_at >= self.config.snapshot_interval_s
        )
        if not due:
            return
        self._ops_since_snapshot, self._last_snapshot_at = 0, time.monotonic()
        if await self._redis.set(self._k_lock, self.replica_id, nx=True, px=30_000):
            try:
                await self._write_snapshot()
            finally:
                await self._redis.delete(self._k_lock)

    async def _flush(self) -> None:
        async with self._flush_lock:
            while self._pending:
                batch = list(islice(self._pending, 0, 500))
                pipe = self._redis.pipeline(transaction=False)
                for data in batch:
                    pipe.xadd(self._k_log, {"op": data})
                await (
                    pipe.execute()
                )  # on failure the batch stays queued; a partial XADD is re-sent (harmless)
                for _ in batch:
                    self._pending.popleft()

    def _degrade(self, exc: BaseException) -> None:
        if isinstance(exc, CorruptSnapshot):  # not an outage: say what it is, each (backed-off) time
            logger.error("replica %s: %s", self.replica_id, exc)
            self._synced, self.last_error = False, str(exc)
            return
        if self._synced or not self._outage_logged:
            self._outage_logged = True
            logger.warning(
                "replica %s: Redis unavailable (%r); routing from the local index, will catch up when it returns",
                self.replica_id,
                exc,
            )
        self._synced, self.last_error = False, repr(exc)
