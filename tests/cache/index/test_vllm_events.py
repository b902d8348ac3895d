"""vLLM's KV event frames, as its own encoder writes them, decoded and renamed into the gateway's hashes.

The frames are golden files written by vLLM 0.33.0's structs and msgspec encoder
(``tests/cache/index/vllm_kv_events.py``): tagged-map events in an array-like batch as that version sends
them, and array-like events as vLLM up to 0.10 sent them; blocks named by SHA-256 bytes and by vLLM's int
form; ``medium``, a LoRA adapter, a cache salt and an image in ``extra_keys``, a removal, and
``AllBlocksCleared``. They run without vLLM; with vLLM 0.33.0 installed (``scripts/setup.sh``) a test also
checks that its encoder still writes exactly these bytes.
"""

from __future__ import annotations

import msgpack
import pytest

from cache.index.ops import apply_op
from cache.index.radix_index import RadixIndex
from cache.index.rekey import ForeignWorkerNames
from cache.index.zmq_consumer import SequenceTracker
from cache.wire.events import AllBlocksCleared, BlockRemoved, BlockStored, decode_event_batch
from cache.wire.hashing import prompt_block_hashes
from cache.wire.tiers import Tier
from tests.cache.index import vllm_kv_events as vllm
from tests.cache.index.vllm_kv_events import CHAIN_A, CHAIN_B, CHAIN_C, CHAIN_D, CHAIN_F, LORA, SALT

MODEL = "model-x"
WORKER = "vllm-0"


def held(index: RadixIndex, tokens: list[int], model: str = MODEL, salt: str = "") -> tuple[int, int, int]:
    """(blocks, device blocks, host blocks) the index says the worker holds of ``tokens``."""
    match = index.match(prompt_block_hashes(tokens, model, salt)).get(WORKER)
    return (match.blocks, match.device_blocks, match.host_blocks) if match else (0, 0, 0)


@pytest.mark.parametrize("encoding", vllm.ENCODINGS)
def test_vllm_frames_decode_and_the_index_holds_what_the_engine_holds(encoding: str) -> None:
    first, second = vllm.golden_payloads(encoding)
    batch = decode_event_batch(first)
    assert batch.data_parallel_rank == 1
    assert [type(e) for e in batch.events] == [BlockStored] * 5 + [BlockRemoved]
    assert batch.events[0].extra_keys == [[SALT], None, None] and batch.events[3].lora_name == LORA

    # The consumer's own path: seq tracking, then the worker's namers (this stream is DP rank 1).
    names = ForeignWorkerNames(WORKER, MODEL, 16)
    tracker, index = SequenceTracker(WORKER, names, rank=1), RadixIndex()
    for op in tracker.handle(0, first):
        apply_op(index, op)
    assert tracker.stats.decode_errors == 0
    # The salt roots the chain and everything under it; the unsalted namespace holds nothing.
    assert held(index, CHAIN_A) == (0, 0, 0)
    assert held(index, CHAIN_A, salt=SALT) == (2, 2, 0)  # block 3 removed
    assert index.holders(prompt_block_hashes(CHAIN_A, MODEL, SALT)[0]) == {WORKER: {Tier.DEVICE, Tier.HOST}}
    assert held(index, CHAIN_A[:32] + CHAIN_F, salt=SALT) == (3, 3, 0)
    # A LoRA adapter's blocks are in its own namespace, as requests naming it as their model are hashed.
    assert held(index, CHAIN_B) == (0, 0, 0) and held(index, CHAIN_B, model=LORA) == (2, 2, 0)
    # An image's blocks depend on more than their tokens: never named, counted.
    assert held(index, CHAIN_C) == (0, 0, 0) and names.rank(1).stats.unresolved == 2

    assert [type(e) for e in decode_event_batch(second).events] == [AllBlocksCleared, BlockStored]
    for op in tracker.handle(1, second):
        apply_op(index, op)
    assert held(index, CHAIN_A, salt=SALT) == held(index, CHAIN_B, model=LORA) == (0, 0, 0)
    assert held(index, CHAIN_D) == (2, 2, 0)
    assert tracker.stats.batches == 2 and tracker.stats.gaps == tracker.stats.restarts == 0


@pytest.mark.parametrize("encoding", vllm.ENCODINGS)
def test_the_golden_frames_are_what_the_installed_vllm_encodes(encoding: str) -> None:
    if vllm.installed_version() != vllm.VERSION:  # only the regeneration needs vLLM
        pytest.skip(f"vLLM {vllm.VERSION} is not installed (scripts/setup.sh installs it)")
    kv = vllm.load()
    assert kv is not None
    assert vllm.golden_batches(kv, encoding) == vllm.golden_payloads(encoding)


def test_malformed_extra_keys_are_an_undecodable_batch_and_odd_ones_are_never_named() -> None:
    def batch(extra_keys: object, seq: int) -> bytes:
        event = {
            "type": "BlockStored",
            "block_hashes": [bytes([seq, 1]) * 16, bytes([seq, 2]) * 16],  # vLLM's hashes cover the keys
            "parent_block_hash": None,
            "token_ids": CHAIN_D,
            "block_size": 16,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": None,
            "extra_keys": extra_keys,
        }
        return msgpack.packb([0.0, [event], 0])

    tracker, index = SequenceTracker(WORKER, ForeignWorkerNames(WORKER, MODEL, 16)), RadixIndex()
    for seq, extra_keys in enumerate([[["s"]], {"a": 1}, [1, 2], [["s"], None, None]]):
        tracker.handle(seq, batch(extra_keys, seq))  # one entry per block, each an array or nil, or purged
    assert tracker.stats.decode_errors == 4
    # Well-formed but not a salt on the chain's first block: a salt further down, two strings, a number.
    for seq, extra_keys in enumerate([[None, ["s"]], [["s", "t"], None], [[7], None]], start=4):
        for op in tracker.handle(seq, batch(extra_keys, seq)):
            apply_op(index, op)
    assert tracker.stats.decode_errors == 4 and held(index, CHAIN_D) == (1, 1, 0)
    assert all(held(index, CHAIN_D, salt=s) == (0, 0, 0) for s in ("s", "t", "7"))
