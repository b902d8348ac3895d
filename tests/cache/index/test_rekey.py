"""Another engine's KV events renamed with the gateway's hashes: the index ends up as the engine's cache is.

The events come from SGLang's own code: its ``ZmqEventPublisher`` (0.5.2, array-like events) over a real
ZMQ socket on loopback, and a frame encoded by SGLang 0.5.23's structs (tagged maps, ``medium``,
``cache_salt``; captured once as a golden file, since that version's module needs triton to import).
The engine's radix cache is a small model in this file that names pages as SGLang does (a chained
SHA-256 truncated to a signed int64); the namer treats those hashes as opaque ids.
"""

from __future__ import annotations

import atexit
import hashlib
import time
from pathlib import Path

import msgspec
import pytest
import sglang.srt.disaggregation.kv_events as sglang_events  # SGLang 0.5.2, installed by scripts/setup.sh
import zmq

from cache.index.ops import apply_op
from cache.index.radix_index import RadixIndex
from cache.index.rekey import ForeignBlockNamer, gateway_block_size
from cache.wire.events import decode_event_batch
from cache.wire.hashing import prompt_block_hashes
from cache.wire.tiers import Tier

GOLDEN = Path(__file__).parent / "golden" / "sglang-0.5.23-event-batch.msgpack"
MODEL = "model-x"
WORKER = "sglang-0"


def sglang_page_hash(parent: int | None, page: list[int]) -> int:
    digest = hashlib.sha256((parent or 0).to_bytes(8, "big", signed=True))
    for t in page:
        digest.update(t.to_bytes(4, "little"))
    return int.from_bytes(digest.digest()[:8], "big", signed=True)


class EngineRadix:
    """An engine's prefix cache of ``page_size``-token pages; yields SGLang's own event objects (a subclass
    may name pages and build events as another engine does: ``page_hash``, ``stored``, ``removed``)."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.pages: dict = {}  # hash -> (parent, tokens)
        self.children: dict = {}

    def page_hash(self, parent, page: list[int]):
        return sglang_page_hash(parent, page)

    def stored(self, hashes: list, parent, tokens: list[int]):
        return sglang_events.BlockStored(
            block_hashes=hashes,
            parent_block_hash=parent,
            token_ids=tokens,
            block_size=self.page_size,
            lora_id=None,
        )

    def removed(self, hashes: list):
        return sglang_events.BlockRemoved(block_hashes=hashes)

    def insert(self, tokens: list[int]):
        parent, stored_hashes, stored_tokens, first_parent = None, [], [], None
        for i in range(0, len(tokens) // self.page_size * self.page_size, self.page_size):
            page = tokens[i : i + self.page_size]
            h = self.page_hash(parent, page)
            if h not in self.pages:
                if not stored_hashes:
                    first_parent = parent
                self.pages[h] = (parent, page)
                self.children.setdefault(parent, set()).add(h)
                stored_hashes.append(h)
                stored_tokens += page
            parent = h
        return [self.stored(stored_hashes, first_parent, stored_tokens)] if stored_hashes else []

    def evict_leaves(self, count: int):
        leaves = [h for h in self.pages if not self.children.get(h)][:count]
        for h in leaves:
            parent, _ = self.pages.pop(h)
            self.children[parent].discard(h)
        return [self.removed(leaves)] if leaves else []

    def held_tokens(self, tokens: list[int]) -> int:
        parent, held = None, 0
        for i in range(0, len(tokens) // self.page_size * self.page_size, self.page_size):
            h = self.page_hash(parent, tokens[i : i + self.page_size])
            if h not in self.pages:
                break
            parent, held = h, held + self.page_size
        return held


class SglangFeed:
    """SGLang's publisher (DP rank 1: its port is the configured one + 1) -> a SUB socket here."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.sub = self.context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        port = self.sub.bind_to_random_port("tcp://127.0.0.1")
        self.publisher = sglang_events.ZmqEventPublisher(
            attn_dp_rank=1, endpoint=f"tcp://127.0.0.1:{port - 1}"
        )
        self.next_seq = None
        deadline = time.monotonic() + 10  # a bound on the slow-joiner wait, not a measured threshold
        while self.next_seq is None:  # connect-side PUB: publish until the first batch arrives
            assert time.monotonic() < deadline, "SGLang's publisher never reached the subscriber"
            self.publisher.publish(sglang_events.KVEventBatch(ts=time.time(), events=[]))
            if self.sub.poll(100):
                _, seq, _ = self.sub.recv_multipart()
                self.next_seq = int.from_bytes(seq, "big") + 1
        while self.sub.poll(200):  # drain the other warm-up batches
            _, seq, _ = self.sub.recv_multipart()
            self.next_seq = int.from_bytes(seq, "big") + 1

    def send(self, events) -> list:
        self.publisher.publish(sglang_events.KVEventBatch(ts=time.time(), events=events))
        assert self.sub.poll(10_000), "no batch arrived"
        _, seq, payload = self.sub.recv_multipart()
        assert int.from_bytes(seq, "big") == self.next_seq  # 8-byte big-endian, no gap
        self.next_seq += 1
        batch = decode_event_batch(payload)
        assert batch.data_parallel_rank == 1
        return batch.events

    def close(self) -> None:
        self.publisher.shutdown()
        atexit.unregister(self.publisher.shutdown)  # it registers itself; a second shutdown only warns
        self.sub.close(linger=0)
        self.context.term()


@pytest.fixture
def feed():
    feed = SglangFeed()
    yield feed
    feed.close()


def prompts(n: int, length: int, shared: int) -> list[list[int]]:
    system = list(range(500, 500 + shared))
    return [system + [10_000 + 100 * i + j for j in range(length - shared)] for i in range(n)]


@pytest.mark.parametrize(("page_size", "block"), [(1, 16), (4, 16), (16, 16), (24, 48), (32, 32)])
def test_the_index_mirrors_the_engine_cache_for_any_page_size(feed, page_size, block) -> None:
    assert gateway_block_size(page_size) == block
    engine, namer, index = EngineRadix(page_size), ForeignBlockNamer(WORKER, MODEL, block), RadixIndex()

    def check(all_prompts: list[list[int]]) -> None:
        for p in all_prompts:  # what the index predicts is exactly what the engine would reuse
            matched = index.match(prompt_block_hashes(p, MODEL, block_size=block)).get(WORKER)
            assert (matched.blocks * block if matched else 0) == engine.held_tokens(p) // block * block

    batch = prompts(6, 100, shared=40)
    for p in batch:
        for event in feed.send(engine.insert(p)):
            for op in namer.ops(event):
                apply_op(index, op)
    check(batch)
    for _ in range(4):  # evict leaves in rounds, as SGLang's LRU does
        for event in feed.send(engine.evict_leaves(7)):
            for op in namer.ops(event):
                apply_op(index, op)
        check(batch)
    for event in feed.send([sglang_events.AllBlocksCleared()]):
        for op in namer.ops(event):
            apply_op(index, op)
    assert not index.match(prompt_block_hashes(batch[0], MODEL)) and len(namer) == 0


def test_a_block_whose_parent_is_unknown_is_skipped_not_guessed() -> None:
    engine, namer = EngineRadix(8), ForeignBlockNamer(WORKER, MODEL)
    (first,) = engine.insert(list(range(64)))
    (rest,) = engine.insert(list(range(64)) + list(range(900, 964)))  # continues the first chain
    assert namer.ops(decode(rest)) == [] and namer.stats.unresolved == 8  # joined after the first
    assert namer.ops(decode(first))[0].hashes == prompt_block_hashes(list(range(64)), MODEL)


def test_sglang_0_5_23_maps_medium_and_salt_from_a_golden_frame() -> None:
    batch = decode_event_batch(GOLDEN.read_bytes())
    assert batch.data_parallel_rank == 2 and batch.events[0].cache_salt == "tenant-a"
    namer, index = ForeignBlockNamer(WORKER, MODEL), RadixIndex()
    for event in batch.events:
        for op in namer.ops(event):
            apply_op(index, op)
    tokens = list(range(1000, 1040))  # 5 pages of 8: two full gateway blocks
    salted = prompt_block_hashes(tokens, MODEL, "tenant-a")
    assert not index.match(prompt_block_hashes(tokens, MODEL))  # the unsalted namespace holds nothing
    held = index.match(salted)[WORKER]
    # the first 16 tokens were copied to host memory, then dropped from the device: host tier only
    assert (held.blocks, held.device_blocks, held.host_blocks) == (2, 1, 1)
    assert index.holders(salted[0]) == {WORKER: {Tier.HOST}}
    assert index.holders(salted[1]) == {WORKER: {Tier.DEVICE}}


def decode(event):
    return decode_event_batch(
        msgspec.msgpack.encode(sglang_events.KVEventBatch(ts=0.0, events=[event]))
    ).events[0]


def test_a_gateway_block_stays_while_another_engine_block_still_completes_it() -> None:
    # The same tokens stored under two engine hashes (SGLang namespaces hashes by keys the gateway does
    # not see): dropping one must not drop the gateway block the other still holds.
    namer, index = ForeignBlockNamer(WORKER, MODEL), RadixIndex()
    tokens = list(range(32))
    stored = [
        sglang_events.BlockStored(
            block_hashes=[h], parent_block_hash=None, token_ids=tokens, block_size=32, lora_id=None
        )
        for h in (111, 222)
    ]
    for event in [*stored, sglang_events.BlockRemoved(block_hashes=[111])]:
        for op in namer.ops(decode(event)):
            apply_op(index, op)
    assert index.match(prompt_block_hashes(tokens, MODEL))[WORKER].blocks == 2
    for op in namer.ops(decode(sglang_events.BlockRemoved(block_hashes=[222]))):
        apply_op(index, op)
    assert not index.match(prompt_block_hashes(tokens, MODEL))
