import asyncio

import zmq
import zmq.asyncio

from cache.index.ops import ClearedOp, StoredOp
from cache.index.radix_index import MatchResult
from cache.index.store import LocalIndexStore
from cache.index.zmq_consumer import KVEventConsumer, SequenceTracker, WorkerFeed
from cache.wire.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    encode_event_batch,
    encode_event_batch_map,
)
from cache.wire.tiers import Tier


def stored(hashes: list[int], parent: int | None = None, medium: str | None = None) -> bytes:
    return encode_event_batch(
        EventBatch(0.0, [BlockStored(hashes, parent, [0] * 16 * len(hashes), 16, medium=medium)])
    )


def test_in_order_batches_become_ops() -> None:
    tracker = SequenceTracker("w")
    assert tracker.handle(0, stored([1, 2])) == [StoredOp("w", None, [1, 2], Tier.DEVICE)]
    assert tracker.handle(1, stored([3], 2, "CPU")) == [StoredOp("w", 2, [3], Tier.HOST)]
    assert tracker.stats.gaps == tracker.stats.restarts == 0 and tracker.stats.batches == 2


def test_gap_restart_and_midstream_join_purge_the_worker() -> None:
    tracker = SequenceTracker("w")
    assert tracker.handle(5, stored([1])) == [ClearedOp("w"), StoredOp("w", None, [1])]  # joined mid-stream
    assert tracker.handle(6, stored([2], 1)) == [StoredOp("w", 1, [2])]
    assert tracker.handle(9, stored([3])) == [ClearedOp("w"), StoredOp("w", None, [3])]  # lost 7, 8
    assert tracker.handle(0, stored([4])) == [ClearedOp("w"), StoredOp("w", None, [4])]  # restarted
    assert (tracker.stats.gaps, tracker.stats.restarts) == (2, 1)
    assert tracker.handle(1, b"\xc1") == [ClearedOp("w")] and tracker.stats.decode_errors == 1


async def test_consumes_real_pub_socket_and_purges_only_the_gapped_worker() -> None:
    ctx = zmq.asyncio.Context()
    pubs = {name: ctx.socket(zmq.PUB) for name in ("a", "b")}
    ports = {name: pub.bind_to_random_port("tcp://127.0.0.1") for name, pub in pubs.items()}
    store = LocalIndexStore()
    consumers = [
        KVEventConsumer(WorkerFeed(n, f"tcp://127.0.0.1:{p}"), store.append_many, ctx)
        for n, p in ports.items()
    ]
    tasks = [asyncio.create_task(c.run()) for c in consumers]

    async def publish(name: str, seq: int, payload: bytes) -> None:
        await pubs[name].send_multipart([b"", seq.to_bytes(8, "big"), payload])

    async def until(predicate) -> None:  # type: ignore[no-untyped-def]
        for _ in range(500):
            if predicate():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("condition not reached")

    try:
        # PUB/SUB drops messages until the subscription lands; re-send seq 0 (idempotent) until it is seen.
        for name in ("a", "b"):
            while name not in store.match([1]):
                await publish(name, 0, stored([1, 2, 3]))
                await asyncio.sleep(0.02)
        await publish("a", 1, encode_event_batch_map(EventBatch(1.0, [BlockRemoved([3], None)])))
        await until(lambda: store.match([1, 2, 3]).get("a") == MatchResult(2, 2, 0))
        await publish("b", 7, stored([9]))  # b lost 1..6
        await until(lambda: store.match([9]) == {"b": MatchResult(1, 1, 0)})
        assert store.match([1, 2, 3]) == {"a": MatchResult(2, 2, 0)}
        await publish("a", 2, encode_event_batch(EventBatch(2.0, [AllBlocksCleared()])))
        await until(lambda: store.match([1]) == {})
        assert consumers[1].stats.gaps == 1 and consumers[0].stats.gaps == 0
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for pub in pubs.values():
            pub.close(linger=0)
        ctx.term()
