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
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from cache.index.ops import ClearedOp, IndexOp, ops_from_event
from cache.wire.events import EventDecodeError, decode_event_batch

logger = logging.getLogger(__name__)

OpSink = Callable[[list[IndexOp]], Awaitable[None]]


@dataclass(frozen=True)
class WorkerFeed:
    worker_id: str
    endpoint: str  # the worker's PUB address, e.g. "tcp://10.0.0.5:5557"
    topic: str = ""  # subscription prefix; vLLM publishes with topic "" by default


@dataclass
class FeedStats:
    batches: int = 0
    gaps: int = 0
    restarts: int = 0
    decode_errors: int = 0
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
        except EventDecodeError as exc:
            # A batch we cannot read is as bad as a lost one: purge rather than keep a view we know is wrong.
            stats.decode_errors += 1
            logger.warning(
                "worker %s: undecodable event batch seq %d (%s); purging its entries",
                self.worker_id,
                seq,
                exc,
            )
            return [ClearedOp(self.worker_id)]
        stats.batches += 1
        ops.extend(ops_from_event(self.worker_id, event) for event in batch.events)
        return ops


class KVEventConsumer:
    """SUB socket on one worker's feed; hands each message's ops to ``sink`` (e.g. ``store.append_many``)."""

    def __init__(self, feed: WorkerFeed, sink: OpSink, context: zmq.asyncio.Context | None = None) -> None:
        self.feed = feed
        self._sink = sink
        self._context = context or zmq.asyncio.Context.instance()
        self.tracker = SequenceTracker(feed.worker_id)

    @property
    def stats(self) -> FeedStats:
        return self.tracker.stats

    async def run(self) -> None:
        """Consume until cancelled. Malformed messages are counted and skipped; nothing else stops it."""
        socket = self._context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SUBSCRIBE, self.feed.topic.encode())
        socket.connect(self.feed.endpoint)
        try:
            while True:
                frames = await socket.recv_multipart()
                if len(frames) != 3 or len(frames[1]) != 8:
                    self.stats.decode_errors += 1
                    logger.warning(
                        "worker %s: unexpected %d-frame message, skipped", self.feed.worker_id, len(frames)
                    )
                    continue
                ops = self.tracker.handle(int.from_bytes(frames[1], "big"), frames[2])
                if ops:
                    await self._sink(ops)
        finally:
            socket.close(linger=0)
