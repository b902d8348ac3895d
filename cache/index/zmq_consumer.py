"""Consume one worker's KV events from its ZMQ PUB socket (vLLM / SGLang / prefixgate engine) into index ops.

Wire format (vLLM's ZmqEventPublisher): multipart ``[topic, seq, payload]`` where ``seq`` is an 8-byte
big-endian counter starting at 0 and ``payload`` a msgpack EventBatch (see ``cache.wire.events``).

Sequence tracking, per worker feed:
* ``seq == last + 1``: in order, apply.
* ``seq > last + 1`` (messages lost: PUB drops on HWM, network blips) or the first message after
  subscribing is not seq 0 (we joined mid-stream): what the worker holds is unknown, so its entries are
  purged (a ClearedOp for that worker only) before the batch is applied. The index then under-reports that
  worker until it stores blocks again, which only costs cache hits, never correctness.
* ``seq <= last``: the publisher restarted (its counter reset), so its cache is gone: purge as above.
vLLM's replay ROUTER socket could fill gaps instead of purging; that is not implemented.

Publishers are not trusted: every message is decoded on its own and checked field by field (a batch
whose events decode but carry a non-numeric hash or an unknown medium counts as undecodable); a bad one
is logged, counted (``FeedStats.decode_errors``, ``on_bad_message``) and the worker purged, and the next
message is read as usual. Messages over ``MAX_MESSAGE_BYTES`` are refused by ZMQ itself (``MAXMSGSIZE``);
ZMQ then drops the connection for good (no automatic reconnect after a protocol error), so a socket
monitor watches for disconnects and the subscription is made afresh. Should anything else go wrong (the sink raising, the
socket failing), ``run`` logs it, purges the worker, waits ``RESTART_DELAY_S`` and subscribes afresh:
only cancellation ends it. With ``WorkerFeed.curve_server_key`` the subscription is CURVE-encrypted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from cache.index.ops import ClearedOp, IndexOp, RemovedOp, StoredOp, is_block_hash, ops_from_event
from cache.wire.events import decode_event_batch

logger = logging.getLogger(__name__)

OpSink = Callable[[list[IndexOp]], Awaitable[None]]
MAX_MESSAGE_BYTES = 16 * 2**20  # a batch is one engine step's events: far below this
RESTART_DELAY_S = 1.0


@dataclass(frozen=True)
class WorkerFeed:
    worker_id: str
    endpoint: str  # the worker's PUB address, e.g. "tcp://10.0.0.5:5557"
    topic: str = ""  # subscription prefix; vLLM publishes with topic "" by default
    curve_server_key: str | None = None  # the publisher's CURVE public key (Z85): encrypt the feed
    curve_client_keys: tuple[bytes, bytes] | None = None  # (public, secret) Z85; default: ephemeral


@dataclass
class FeedStats:
    batches: int = 0
    gaps: int = 0
    restarts: int = 0
    decode_errors: int = 0
    consumer_restarts: int = 0
    last_seq: int | None = None


class SequenceTracker:
    """Turns one feed's ``(seq, payload)`` messages into index ops, purging the worker on gaps/restarts."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.stats = FeedStats()

    def handle(self, seq: int, payload: bytes) -> list[IndexOp]:
        stats = self.stats
        ops: list[IndexOp] = []
        last = stats.last_seq
        if last is None:
            if seq != 0:
                stats.gaps += 1  # joined mid-stream: whatever we held for this worker may be stale
                ops.append(ClearedOp(self.worker_id))
        elif seq <= last:
            stats.restarts += 1
            logger.info(
                "worker %s: event seq went %d -> %d (restart); purging its entries", self.worker_id, last, seq
            )
            ops.append(ClearedOp(self.worker_id))
        elif seq > last + 1:
            stats.gaps += 1
            logger.warning(
                "worker %s: missed events %d..%d; purging its entries", self.worker_id, last + 1, seq - 1
            )
            ops.append(ClearedOp(self.worker_id))
        stats.last_seq = seq
        try:
            batch = decode_event_batch(payload)
            decoded = [_checked(ops_from_event(self.worker_id, event)) for event in batch.events]
        except Exception as exc:  # any shape a hostile publisher can send: wrong types, values, nesting
            # A batch we cannot read is as bad as a lost one: purge rather than keep a view we know is wrong.
            stats.decode_errors += 1
            logger.warning(
                "worker %s: undecodable event batch seq %d (%s: %s); purging its entries",
                self.worker_id,
                seq,
                type(exc).__name__,
                exc,
            )
            return [ClearedOp(self.worker_id)]
        stats.batches += 1
        ops.extend(decoded)
        return ops


def _checked(op: IndexOp) -> IndexOp:
    """``op`` if its hashes are u64s, as the index and its snapshots require; ValueError otherwise."""
    if isinstance(op, StoredOp | RemovedOp):
        parent = op.parent_hash if isinstance(op, StoredOp) else None
        if not isinstance(op.hashes, list) or not all(is_block_hash(h) for h in op.hashes):
            raise ValueError("block hashes must be u64 integers")
        if parent is not None and not is_block_hash(parent):
            raise ValueError("the parent hash must be a u64 integer")
    return op


class KVEventConsumer:
    """SUB socket on one worker's feed; hands each message's ops to ``sink`` (e.g. ``store.append_many``).
    ``on_bad_message(reason)`` is called for every message skipped ("frames", "decode") and every restart
    ("restart"), e.g. to count them in a metric."""

    def __init__(
        self,
        feed: WorkerFeed,
        sink: OpSink,
        context: zmq.asyncio.Context | None = None,
        on_bad_message: Callable[[str], None] | None = None,
    ) -> None:
        self.feed = feed
        self._sink = sink
        self._context = context or zmq.asyncio.Context.instance()
        self._on_bad_message = on_bad_message or (lambda reason: None)
        self.tracker = SequenceTracker(feed.worker_id)

    @property
    def stats(self) -> FeedStats:
        return self.tracker.stats

    async def run(self) -> None:
        """Consume until cancelled. Malformed messages are counted and skipped; any other failure restarts
        the subscription (the worker's entries purged first); nothing but cancellation stops it."""
        while True:
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except _Disconnected:
                logger.warning(
                    "worker %s: KV event feed disconnected (publisher gone, or a message over %d bytes); "
                    "subscribing again",
                    self.feed.worker_id,
                    MAX_MESSAGE_BYTES,
                )
                self.tracker.stats.last_seq = None
                await asyncio.sleep(RESTART_DELAY_S)
            except Exception:
                self.stats.consumer_restarts += 1
                self._on_bad_message("restart")
                logger.exception(
                    "worker %s: KV event consumer failed; restarting in %.0f s",
                    self.feed.worker_id,
                    RESTART_DELAY_S,
                )
                self.tracker.stats.last_seq = None  # the next message is a fresh join: purges the worker
                await asyncio.sleep(RESTART_DELAY_S)

    async def _consume(self) -> None:
        socket = self._context.socket(zmq.SUB)
        monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        poller = zmq.asyncio.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
            if self.feed.curve_server_key:
                public, secret = (
                    zmq.curve_keypair()
                )  # an ephemeral client key: the server key is what matters
                socket.curve_serverkey = self.feed.curve_server_key.encode()
                socket.curve_publickey, socket.curve_secretkey = public, secret
            socket.setsockopt(zmq.SUBSCRIBE, self.feed.topic.encode())
            socket.connect(self.feed.endpoint)
            while True:
                ready = dict(await poller.poll())
                if monitor in ready:
                    await monitor.recv_multipart()
                    raise _Disconnected
                frames = await socket.recv_multipart()
                if len(frames) != 3 or len(frames[1]) != 8:
                    self.stats.decode_errors += 1
                    self._on_bad_message("frames")
                    logger.warning(
                        "worker %s: unexpected %d-frame message, skipped", self.feed.worker_id, len(frames)
                    )
                    continue
                errors_before = self.stats.decode_errors
                ops = self.tracker.handle(int.from_bytes(frames[1], "big"), frames[2])
                if self.stats.decode_errors != errors_before:
                    self._on_bad_message("decode")
                if ops:
                    await self._sink(ops)
        finally:
            socket.disable_monitor()
            monitor.close(linger=0)
            socket.close(linger=0)


class _Disconnected(Exception):
    """The SUB socket lost its publisher: subscribe again (ZMQ will not after a protocol error)."""
