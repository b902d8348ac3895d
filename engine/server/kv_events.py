"""KV cache events over ZMQ PUB, as vLLM publishes them, so any indexer can mirror this engine's cache.

Wire: multipart ``[topic, seq, payload]``; ``seq`` is an 8-byte big-endian counter from 0, ``payload``
a msgpack ``EventBatch`` in vLLM's array-like encoding (``cache.wire.events``). Block hashes are
``cache.wire.hashing``'s chained hashes rooted at ``namespace_seed(model_id)``, so they equal what the
gateway computes for the same token ids.

Threading: the prefix cache calls the ``CacheListener`` methods on the engine thread; they only put
events on a queue. One sender thread owns the socket (ZMQ sockets are not thread-safe) and sends
everything that arrived together as one batch: a step's events are queued within microseconds of
each other, so a batch is in practice one engine step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

import zmq

from cache.wire.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEvent,
    encode_event_batch,
)
from cache.wire.hashing import block_hashes, namespace_seed
from engine.kv.prefix_cache import BlockHasher

log = logging.getLogger(__name__)

_STOP = object()


def make_block_hasher(model_id: str, page_size: int) -> BlockHasher:
    """The engine's page names: ``cache.wire.hashing`` chains with one block per KV page."""
    seed = namespace_seed(model_id)

    def hasher(parent: int | None, token_ids: Sequence[int]) -> list[int]:
        return block_hashes(token_ids, page_size, seed=seed, parent=parent)

    return hasher


def make_namespace_hash(model_id: str) -> Callable[[str], int]:
    """Chain roots of salted namespaces: a tenant's blocks hash as the gateway hashes them for it."""
    return lambda salt: namespace_seed(model_id, salt)


class KVEventPublisher:
    """A ``CacheListener`` that publishes the prefix cache's changes. ``start`` binds and announces
    AllBlocksCleared (a fresh engine holds nothing); ``close`` flushes what is queued and unbinds."""

    def __init__(
        self,
        endpoint: str,
        page_size: int,
        topic: str = "",
        batch_window_s: float = 0.002,
        hwm: int = 100_000,
    ) -> None:
        self.endpoint = endpoint
        self.page_size = page_size
        self.topic = topic.encode()
        self.batch_window_s = batch_window_s
        self.hwm = hwm
        self._queue: queue.SimpleQueue[KVEvent | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self.seq = 0  # next sequence number (owned by the sender thread)

    # -- CacheListener (engine thread) ------------------------------------------------------------
    def stored(self, parent_hash: int | None, hashes: list[int], token_ids: list[int]) -> None:
        self._queue.put(BlockStored(list(hashes), parent_hash, list(token_ids), self.page_size))

    def removed(self, hashes: list[int]) -> None:
        self._queue.put(BlockRemoved(list(hashes)))

    def cleared(self) -> None:
        self._queue.put(AllBlocksCleared())

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._queue.put(AllBlocksCleared())
        self._thread = threading.Thread(target=self._run, name="kv-event-publisher", daemon=True)
        self._thread.start()
        self._bound.wait(timeout=10)
        if self._error is not None:
            raise RuntimeError(f"cannot bind the KV event socket {self.endpoint}: {self._error}")

    def close(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    # -- sender thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        context = zmq.Context()
        socket = context.socket(zmq.PUB)
        try:
            socket.setsockopt(zmq.SNDHWM, self.hwm)
            socket.setsockopt(zmq.LINGER, 1000)
            socket.bind(self.endpoint)
            self.endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)  # resolves a wildcard port
        except zmq.ZMQError as exc:
            self._error = exc
            socket.close(linger=0)
            context.term()
            self._bound.set()
            return
        self._bound.set()
        log.info("publishing KV events on %s", self.endpoint)
        try:
            stopping = False
            while not stopping:
                events, stopping = self._next_batch()
                if events:
                    batch = EventBatch(time.time(), events)
                    socket.send_multipart(
                        [self.topic, self.seq.to_bytes(8, "big"), encode_event_batch(batch)]
                    )
                    self.seq += 1
        finally:
            socket.close()
            context.term()

    def _next_batch(self) -> tuple[list[KVEvent], bool]:
        """Block for one event, then take whatever follows within the batch window."""
        item = self._queue.get()
        if item is _STOP:
            return [], True
        events = [item]
        deadline = time.monotonic() + self.batch_window_s
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return events, False  # type: ignore[return-value]
            if item is _STOP:
                return events, True  # type: ignore[return-value]
            events.append(item)
