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
  ``last`` survives a disconnect, so an engine that restarts and publishes from seq 0 again is seen.
Where the engine has a replay socket (``WorkerFeed.replay_endpoint``: SGLang's and vLLM's ROUTER; request
= the 8-byte big-endian start seq, replies ``(seq, payload)``, from vLLM 0.33 on ``(topic, seq, payload)``,
ending with seq -1), a gap or a mid-stream
join first asks it for the missed batches; only what the replay cannot cover (its buffer is bounded) is
purged.

Foreign hashes: for an engine that names blocks its own way (SGLang, vLLM), ``names`` renames every event
into the gateway's hashes (``cache.index.rekey``); each purge then also resets the worker's namers.
One feed is one DP rank's stream; the engine offsets each rank's port by the rank.
SGLang and vLLM *connect* their PUB socket to a non-wildcard endpoint: ``WorkerFeed.bind`` makes the SUB
side bind it instead.

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
from cache.index.rekey import ForeignWorkerNames
from cache.wire.events import KVEvent, decode_event_batch

logger = logging.getLogger(__name__)

OpSink = Callable[[list[IndexOp]], Awaitable[None]]
MAX_MESSAGE_BYTES = 16 * 2**20  # a batch is one engine step's events: far below this
RESTART_DELAY_S = 1.0
REPLAY_TIMEOUT_S = 5.0  # between two replies of a replay; past it, what was not replayed is purged
MAX_REPLAY_BATCHES = 100_000  # SGLang and vLLM keep 10,000 by default
_END_OF_REPLAY = -1


@dataclass(frozen=True)
class WorkerFeed:
    worker_id: str
    endpoint: str  # the worker's PUB address, e.g. "tcp://10.0.0.5:5557"
    topic: str = ""  # subscription prefix; vLLM publishes with topic "" by default
    curve_server_key: str | None = None  # the publisher's CURVE public key (Z85): encrypt the feed
    curve_client_keys: tuple[bytes, bytes] | None = None  # (public, secret) Z85; default: ephemeral
    rank: int = 0  # the engine's DP rank this stream is (events of foreign engines are named per rank)
    bind: bool = False  # the engine connects its PUB to ``endpoint``: bind the SUB there
    replay_endpoint: str | None = None  # the engine's replay ROUTER, where it has one


@dataclass
class FeedStats:
    batches: int = 0
    gaps: int = 0
    replayed: int = 0  # batches recovered from the engine's replay socket
    restarts: int = 0
    decode_errors: int = 0
    consumer_restarts: int = 0
    last_seq: int | None = None


class SequenceTracker:
    """Turns one feed's ``(seq, payload)`` messages into index ops, purging the worker on gaps/restarts."""

    def __init__(self, worker_id: str, names: ForeignWorkerNames | None = None, rank: int = 0) -> None:
        """``names``: rename a foreign engine's events (this feed is DP rank ``rank``); None: the events
        already carry the gateway's hashes."""
        self.worker_id = worker_id
        self.names = names
        self.rank = rank
        self.stats = FeedStats()

    def missed_from(self, seq: int) -> int | None:
        """The first seq a replay should start at before ``seq`` is handled, or None if none is missing
        (a restart is not a gap: the engine's earlier batches describe a cache that is gone)."""
        last = self.stats.last_seq
        if last is None:
            return 0 if seq != 0 else None
        return last + 1 if seq > last + 1 else None

    def handle(self, seq: int, payload: bytes) -> list[IndexOp]:
        stats = self.stats
        ops: list[IndexOp] = []
        last = stats.last_seq
        if last is None:
            if seq != 0:
                stats.gaps += 1  # joined mid-stream: whatever we held for this worker may be stale
                ops.append(self._purge())
        elif seq <= last:
            stats.restarts += 1
            logger.info(
                "worker %s: event seq went %d -> %d (restart); purging its entries", self.worker_id, last, seq
            )
            ops.append(self._purge())
        elif seq > last + 1:
            stats.gaps += 1
            logger.warning(
                "worker %s: missed events %d..%d; purging its entries", self.worker_id, last + 1, seq - 1
            )
            ops.append(self._purge())
        stats.last_seq = seq
        try:
            batch = decode_event_batch(payload)
            decoded = [_checked(op) for event in batch.events for op in self._ops(event)]
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
            return [self._purge()]
        stats.batches += 1
        ops.extend(decoded)
        return ops

    def _ops(self, event: KVEvent) -> list[IndexOp]:
        if self.names is None:
            return [ops_from_event(self.worker_id, event)]
        return self.names.ops(self.rank, event)

    def _purge(self) -> ClearedOp:
        if self.names is not None:
            self.names.reset()
        return ClearedOp(self.worker_id)


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
        names: ForeignWorkerNames | None = None,
    ) -> None:
        self.feed = feed
        self._sink = sink
        self._context = context or zmq.asyncio.Context.instance()
        self._on_bad_message = on_bad_message or (lambda reason: None)
        self.tracker = SequenceTracker(feed.worker_id, names, feed.rank)

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
                await asyncio.sleep(RESTART_DELAY_S)  # last_seq kept: a restarted engine shows as one
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
                # The gateway's own certificate where the worker lists its clients; else an ephemeral one.
                public, secret = self.feed.curve_client_keys or zmq.curve_keypair()
                socket.curve_serverkey = self.feed.curve_server_key.encode()
                socket.curve_publickey, socket.curve_secretkey = public, secret
            socket.setsockopt(zmq.SUBSCRIBE, self.feed.topic.encode())
            if self.feed.bind:
                socket.bind(self.feed.endpoint)
            else:
                socket.connect(self.feed.endpoint)
            while True:
                ready = dict(await poller.poll())
                if monitor in ready:
                    await monitor.recv_multipart()
                    if not self.feed.bind:  # a bound socket takes the engine's reconnection as it is
                        raise _Disconnected
                    continue
                frames = await socket.recv_multipart()
                if len(frames) != 3 or len(frames[1]) != 8:
                    self.stats.decode_errors += 1
                    self._on_bad_message("frames")
                    logger.warning(
                        "worker %s: unexpected %d-frame message, skipped", self.feed.worker_id, len(frames)
                    )
                    continue
                seq = int.from_bytes(frames[1], "big")
                start = self.tracker.missed_from(seq)
                messages = [(seq, frames[2])]
                if start is not None and self.feed.replay_endpoint:
                    messages[:0] = await self._replay(start, seq)
                for message_seq, payload in messages:
                    errors_before = self.stats.decode_errors
                    ops = self.tracker.handle(message_seq, payload)
                    if self.stats.decode_errors != errors_before:
                        self._on_bad_message("decode")
                    if ops:
                        await self._sink(ops)
        finally:
            socket.disable_monitor()
            monitor.close(linger=0)
            socket.close(linger=0)

    async def _replay(self, start: int, before: int) -> list[tuple[int, bytes]]:
        """The engine's batches ``start..before-1`` as far as its replay buffer still has them, in order;
        whatever is missing (a buffer that wrapped, a timeout) is left for the tracker to purge."""
        assert self.feed.replay_endpoint is not None
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        batches: list[tuple[int, bytes]] = []
        try:
            socket.connect(self.feed.replay_endpoint)
            await socket.send_multipart([b"", start.to_bytes(8, "big")])
            while len(batches) < MAX_REPLAY_BATCHES:
                if not await socket.poll(REPLAY_TIMEOUT_S * 1000):
                    logger.warning("worker %s: replay from seq %d timed out", self.feed.worker_id, start)
                    break
                frames = await socket.recv_multipart()
                # SGLang replies (delimiter, seq, payload); vLLM 0.33 adds the topic: (delimiter, topic,
                # seq, payload)
                if len(frames) not in (3, 4) or len(frames[-2]) != 8:
                    break
                seq = int.from_bytes(frames[-2], "big", signed=True)
                if seq == _END_OF_REPLAY:
                    break
                if start <= seq < before:
                    batches.append((seq, frames[-1]))
        finally:
            socket.close(linger=0)
        self.stats.replayed += len(batches)
        logger.info(
            "worker %s: replayed %d of %d missed batches", self.feed.worker_id, len(batches), before - start
        )
        return batches


class _Disconnected(Exception):
    """The SUB socket lost its publisher: subscribe again (ZMQ will not after a protocol error)."""
