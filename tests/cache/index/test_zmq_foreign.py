"""The KV event consumer on SGLang's own publisher: renamed blocks, DP ranks, gaps filled by replay, restarts.

Every frame comes from SGLang 0.5.2's ``ZmqEventPublisher`` (PUB + replay ROUTER) on loopback, with the
endpoint SGLang is given by ``prefixgate serve --engine sglang``: a non-wildcard address SGLang connects
to, which the consumer binds (``WorkerFeed.bind``). The engine's cache is ``EngineRadix`` (SGLang's page
hashes); after each step the index must predict exactly the tokens the engine would reuse.
"""

from __future__ import annotations

import asyncio
import atexit
import socket
import time
from collections.abc import Callable

import sglang.srt.disaggregation.kv_events as sglang_events
import zmq.asyncio

from cache.index.rekey import ForeignWorkerNames
from cache.index.store import LocalIndexStore
from cache.index.zmq_consumer import KVEventConsumer, WorkerFeed
from cache.wire.hashing import prompt_block_hashes
from tests.cache.index.test_rekey import MODEL, WORKER, EngineRadix, prompts

BLOCK = 16


class Rank:
    """One DP rank of an SGLang server: its radix cache and its publisher (PUB port + rank)."""

    def __init__(
        self, rank: int, port: int, replay_port: int, buffer_steps: int = 10_000, hwm: int = 2
    ) -> None:
        """``hwm``: a tiny high-water mark, so that batches published while no subscriber reads are lost
        (ZMQ keeps a connecting PUB's queue across reconnections up to it)."""
        self.engine = EngineRadix(4)
        self.publisher = sglang_events.ZmqEventPublisher(
            attn_dp_rank=rank,
            endpoint=f"tcp://127.0.0.1:{port}",
            replay_endpoint=f"tcp://127.0.0.1:{replay_port}",
            buffer_steps=buffer_steps,
            hwm=hwm,
        )

    def publish(self, events: list) -> None:
        self.publisher.publish(sglang_events.KVEventBatch(ts=time.time(), events=events))

    def close(self) -> None:
        self.publisher.shutdown()
        atexit.unregister(self.publisher.shutdown)


async def until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20  # a bound on waiting, not a measured threshold
    while not predicate():
        assert time.monotonic() < deadline, f"never reached: {what}"
        await asyncio.sleep(0.02)


def held_by_index(store: LocalIndexStore, tokens: list[int]) -> int:
    match = store.match(prompt_block_hashes(tokens, MODEL, block_size=BLOCK)).get(WORKER)
    return match.blocks * BLOCK if match else 0


def mirrors(store: LocalIndexStore, ranks: list[Rank], batch: list[list[int]]) -> bool:
    return all(
        held_by_index(store, p) == max(r.engine.held_tokens(p) // BLOCK * BLOCK for r in ranks) for p in batch
    )


def port_pairs(count: int) -> list[int]:
    """``count`` ports ``p`` whose ``p + 1`` is free too (SGLang offsets a DP rank's ports by the rank),
    all held open together until all are chosen, so no pair overlaps another."""
    held: list[socket.socket] = []
    bases: list[int] = []
    try:
        while len(bases) < count:
            first = socket.socket()
            first.bind(("127.0.0.1", 0))
            held.append(first)
            second = socket.socket()
            try:
                second.bind(("127.0.0.1", first.getsockname()[1] + 1))
            except OSError:
                second.close()
                continue
            held.append(second)
            bases.append(first.getsockname()[1])
        return bases
    finally:
        for s in held:
            s.close()


def consumer_for(rank: int, pub: int, replay: int, store: LocalIndexStore, names, ctx) -> KVEventConsumer:
    feed = WorkerFeed(
        WORKER,
        f"tcp://127.0.0.1:{pub + rank}",
        rank=rank,
        bind=True,
        replay_endpoint=f"tcp://127.0.0.1:{replay + rank}",
    )
    return KVEventConsumer(feed, store.append_many, ctx, names=names)


async def warm_up(consumer: KVEventConsumer, rank: Rank) -> None:
    """The publisher connects: batches are dropped until the subscription lands; send empty ones."""
    deadline = time.monotonic() + 20
    while consumer.stats.batches == 0:
        assert time.monotonic() < deadline, "the publisher never reached the consumer"
        rank.publish([])
        await asyncio.sleep(0.05)


async def two_ranks_indexed_then_a_gap_replayed(
    consumers: list[KVEventConsumer], tasks: list[asyncio.Task], ranks: list, store: LocalIndexStore
) -> list[list[int]]:
    """Both ranks (their engines and publishers: ``Rank`` or vLLM's) cache requests of their own, and the
    index must mirror them; then rank 1's subscription goes away while it caches more (beyond the PUB
    socket's high-water mark: some batches are lost) and evicts some, and comes back: the missed batches
    must come back from rank 1's replay socket. Returns every prompt cached."""
    for consumer, rank in zip(consumers, ranks, strict=True):
        await warm_up(consumer, rank)
    batch = prompts(6, 80, shared=32)
    for i, p in enumerate(batch):  # each rank caches its own requests
        rank = ranks[i % 2]
        rank.publish(rank.engine.insert(p))
    # A lost batch shows as a gap when the next one arrives: keep batches coming, as an engine does.
    await until(lambda: all(map(nudge, ranks)) and mirrors(store, ranks, batch), "both ranks indexed")

    tasks[1].cancel()
    await asyncio.gather(tasks[1], return_exceptions=True)
    more = [[t + 7 for t in p] for p in prompts(12, 64, shared=0)]
    for p in more:
        ranks[1].publish(ranks[1].engine.insert(p))
    ranks[1].publish(ranks[1].engine.evict_leaves(5))
    tasks[1] = asyncio.create_task(consumers[1].run())
    await warm_up_again(consumers[1], ranks[1])
    await until(
        lambda: all(map(nudge, ranks)) and mirrors(store, ranks, batch + more), "missed batches replayed"
    )
    assert consumers[1].stats.replayed > 0 and consumers[1].stats.gaps == 0
    assert all(c.stats.decode_errors == 0 for c in consumers)
    return batch + more


async def stop(tasks: list[asyncio.Task], ranks: list, ctx: zmq.asyncio.Context) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for rank in ranks:
        rank.close()
    ctx.term()


async def test_two_dp_ranks_gaps_replayed_and_a_restart_purges() -> None:
    pub, replay = port_pairs(2)
    ctx = zmq.asyncio.Context()
    store = LocalIndexStore()
    names = ForeignWorkerNames(WORKER, MODEL, BLOCK)
    consumers = [consumer_for(r, pub, replay, store, names, ctx) for r in (0, 1)]
    tasks = [asyncio.create_task(c.run()) for c in consumers]
    ranks = [Rank(0, pub, replay), Rank(1, pub, replay)]
    try:
        cached = await two_ranks_indexed_then_a_gap_replayed(consumers, tasks, ranks, store)

        # Rank 0's engine restarts: an empty cache, seq from 0 again. The worker is purged (all ranks:
        # purges are per worker) and rebuilt from what rank 0 stores next.
        ranks[0].close()
        await port_released(replay)  # the old publisher's thread unbinds its replay socket on its own time
        ranks[0] = Rank(0, pub, replay)
        await until(lambda: nudge(ranks[0]) and consumers[0].stats.restarts == 1, "the restart seen")
        assert all(held_by_index(store, p) == 0 for p in cached)
        after = [t + 3 for t in prompts(1, 48, shared=0)[0]]
        ranks[0].publish(ranks[0].engine.insert(after))
        await until(
            lambda: nudge(ranks[0]) and held_by_index(store, after) == 48, "rebuilt after the restart"
        )
    finally:
        await stop(tasks, ranks, ctx)


async def port_released(port: int) -> None:
    deadline = time.monotonic() + 20  # a bound on waiting, not a measured threshold
    while True:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
                return
            except OSError:
                assert time.monotonic() < deadline, f"port {port} was never released"
        await asyncio.sleep(0.05)


def nudge(rank: Rank) -> bool:
    """Publish an empty batch (the new publisher's first ones are lost until its subscriber is known)."""
    rank.publish([])
    return True


async def warm_up_again(consumer: KVEventConsumer, rank: Rank) -> None:
    before = consumer.stats.batches
    deadline = time.monotonic() + 20
    while consumer.stats.batches == before:
        assert time.monotonic() < deadline, "the consumer never resubscribed"
        rank.publish([])
        await asyncio.sleep(0.05)


async def test_a_gap_longer_than_the_replay_buffer_purges_and_never_overclaims() -> None:
    pub, replay = port_pairs(2)
    ctx = zmq.asyncio.Context()
    store = LocalIndexStore()
    names = ForeignWorkerNames(WORKER, MODEL, BLOCK)
    consumer = consumer_for(0, pub, replay, store, names, ctx)
    rank = Rank(0, pub, replay, buffer_steps=2)
    task = asyncio.create_task(consumer.run())
    try:
        await warm_up(consumer, rank)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        missed = prompts(12, 64, shared=16)
        for p in missed:  # more than the high-water mark and the two batches kept for replay
            rank.publish(rank.engine.insert(p))
        task = asyncio.create_task(consumer.run())
        await until(lambda: nudge(rank) and consumer.stats.gaps >= 1, "the gap seen")
        # purged: what the replay could not cover is unknown, and the index claims nothing it cannot prove
        for p in missed:
            assert held_by_index(store, p) <= rank.engine.held_tokens(p)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        rank.close()
        ctx.term()
