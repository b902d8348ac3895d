"""A hostile KV event publisher: malformed batches of every kind must be skipped, counted and survived,
by the consumer (``cache.index.zmq_consumer``) and by the gateway's index and metrics."""

from __future__ import annotations

import asyncio

import msgpack
import zmq
import zmq.asyncio

from cache.index.store import LocalIndexStore
from cache.index.zmq_consumer import MAX_MESSAGE_BYTES, KVEventConsumer, WorkerFeed
from cache.wire.events import BlockStored, EventBatch, encode_event_batch


def good(hashes: list[int]) -> bytes:
    return encode_event_batch(EventBatch(0.0, [BlockStored(hashes, None, [], 16)]))


# (An event of an unknown type is not hostile: it is skipped, as msgspec-tolerant decoders do.)
HOSTILE = [
    msgpack.packb(["not-a-number", [["BlockStored", [1], None, [], 16, None, None]]]),  # ts
    msgpack.packb([0.0, [["BlockStored", [1], None, [], 16, None, 12345]]]),  # medium: a number
    msgpack.packb([0.0, [["BlockStored", ["x", "y"], None, [], 16]]]),  # hashes: strings
    msgpack.packb([0.0, [["BlockStored", [1], "parent", [], 16]]]),  # parent: a string
    msgpack.packb([0.0, [["BlockStored", 7, None, [], 16]]]),  # hashes: not a list
    msgpack.packb([0.0, [["BlockRemoved", [[1]]]]]),  # a nested list
    msgpack.packb({"ts": 0.0, "events": {"a": 1}}),
    msgpack.packb([0.0, [[]]]),
    msgpack.packb([[], []]),
    b"\xc1\xc1\xc1",
    b"",
]


async def test_a_hostile_publisher_cannot_stop_or_poison_the_consumer() -> None:
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    store = LocalIndexStore()
    reasons: list[str] = []
    consumer = KVEventConsumer(
        WorkerFeed("w", f"tcp://127.0.0.1:{port}"), store.append_many, ctx, reasons.append
    )
    task = asyncio.create_task(consumer.run())
    seq = 0

    async def publish(*frames: bytes) -> None:
        await pub.send_multipart(list(frames))

    try:
        while "w" not in store.match([1]):  # PUB drops until the subscription lands: resend seq 0
            await publish(b"", seq.to_bytes(8, "big"), good([1]))
            await asyncio.sleep(0.02)
        for payload in HOSTILE:
            seq += 1
            await publish(b"", seq.to_bytes(8, "big"), payload)
        await publish(b"", b"\x00", b"short seq frame")
        await publish(b"only one frame")
        seq += 1
        await publish(b"", seq.to_bytes(8, "big"), good([2]))
        while "w" not in store.match([2]):
            await asyncio.sleep(0.01)
        assert not task.done()  # still consuming
        assert consumer.stats.decode_errors == len(HOSTILE) + 2
        assert reasons.count("decode") == len(HOSTILE) and reasons.count("frames") == 2
        assert all(isinstance(h, int) for h in store.index._blocks)  # nothing non-numeric got in
        # An oversized message is refused by ZMQ (MAXMSGSIZE drops the connection, which reconnects).
        seq += 1
        await publish(b"", seq.to_bytes(8, "big"), b"\x00" * (MAX_MESSAGE_BYTES + 1))
        seq += 1
        while "w" not in store.match([3]):
            await publish(b"", seq.to_bytes(8, "big"), good([3]))
            await asyncio.sleep(0.05)
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        pub.close(0)
        ctx.term()


async def test_a_consumer_whose_sink_fails_restarts() -> None:
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    store = LocalIndexStore()
    failures = [RuntimeError("the store broke")]

    async def sink(ops):  # type: ignore[no-untyped-def]
        if failures:
            raise failures.pop()
        await store.append_many(ops)

    reasons: list[str] = []
    consumer = KVEventConsumer(WorkerFeed("w", f"tcp://127.0.0.1:{port}"), sink, ctx, reasons.append)
    task = asyncio.create_task(consumer.run())
    try:
        seq = 0
        while "w" not in store.match([1]):
            await pub.send_multipart([b"", seq.to_bytes(8, "big"), good([1])])
            seq += 1
            await asyncio.sleep(0.05)
        assert consumer.stats.consumer_restarts == 1 and "restart" in reasons
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        pub.close(0)
        ctx.term()
