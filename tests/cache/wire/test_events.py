import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cache.wire.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    EventDecodeError,
    decode_event_batch,
    encode_event_batch,
    encode_event_batch_map,
    normalize_block_hash,
)

U64 = st.integers(min_value=0, max_value=2**64 - 1)
stored = st.builds(
    BlockStored,
    block_hashes=st.lists(U64, max_size=4),
    parent_block_hash=st.none() | U64,
    token_ids=st.lists(st.integers(0, 2**31), max_size=8),
    block_size=st.sampled_from([16, 32]),
    lora_id=st.none() | st.integers(0, 5),
    medium=st.sampled_from([None, "GPU", "CPU"]),
    lora_name=st.none() | st.text(max_size=5),
)
removed = st.builds(
    BlockRemoved, block_hashes=st.lists(U64, max_size=4), medium=st.sampled_from([None, "GPU", "CPU"])
)
batches = st.builds(
    EventBatch,
    ts=st.floats(0, 2e9),
    events=st.lists(st.one_of(stored, removed, st.just(AllBlocksCleared())), max_size=5),
    data_parallel_rank=st.none() | st.integers(0, 7),
)


@given(batches)
def test_both_encodings_round_trip(batch: EventBatch) -> None:
    assert decode_event_batch(encode_event_batch(batch)) == batch
    assert decode_event_batch(encode_event_batch_map(batch)) == batch


def test_array_encoding_is_vllm_layout() -> None:
    batch = EventBatch(1.5, [BlockStored([7], None, [1, 2], 2, None, "GPU", None), BlockRemoved([7], "CPU")])
    assert msgpack.unpackb(encode_event_batch(batch)) == [
        1.5,
        [["BlockStored", [7], None, [1, 2], 2, None, "GPU", None], ["BlockRemoved", [7], "CPU"]],
    ]


def test_decodes_sglang_and_old_vllm_arrays_without_trailing_fields() -> None:
    # SGLang: BlockStored has no medium, BlockRemoved only hashes; old vLLM: no data_parallel_rank.
    payload = msgpack.packb(
        [
            2.0,
            [["BlockStored", [1, 2], None, [5] * 32, 16, None], ["BlockRemoved", [2]], ["AllBlocksCleared"]],
        ]
    )
    batch = decode_event_batch(payload)
    assert batch.events == [
        BlockStored([1, 2], None, [5] * 32, 16, None, None, None),
        BlockRemoved([2], None),
        AllBlocksCleared(),
    ]
    assert batch.data_parallel_rank is None


def test_decodes_newer_vllm_maps_with_bytes_hashes_and_extra_fields() -> None:
    digest = bytes(range(32))
    payload = msgpack.packb(
        {
            "ts": 3.0,
            "events": [
                {
                    "type": "BlockStored",
                    "block_hashes": [digest],
                    "parent_block_hash": None,
                    "token_ids": [1],
                    "block_size": 1,
                    "lora_id": None,
                    "medium": "GPU",
                    "lora_name": "x",
                    "extra_keys": None,
                    "group_idx": 0,
                },
                {"type": "SomethingNew", "field": 1},
            ],
            "data_parallel_rank": 1,
        },
        use_bin_type=True,
    )
    batch = decode_event_batch(payload)
    # vLLM's own bytes->int conversion: big-endian, low 64 bits.
    assert batch.events == [BlockStored([int.from_bytes(digest[-8:], "big")], None, [1], 1, None, "GPU", "x")]
    assert batch.data_parallel_rank == 1


def test_normalizes_signed_and_bytes_hashes() -> None:
    assert normalize_block_hash(-1) == 2**64 - 1
    assert normalize_block_hash(b"\x01\x02") == 0x0102
    with pytest.raises(TypeError):
        normalize_block_hash("x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",
        msgpack.packb(5),
        msgpack.packb([1.0]),
        msgpack.packb({"ts": 1}),
        msgpack.packb([1.0, [["BlockStored", [1]]]]),
        msgpack.packb([1.0, [[3]]]),
        msgpack.packb([1.0, [{"block_hashes": []}]]),
    ],
)
def test_rejects_malformed_payloads(payload: bytes) -> None:
    with pytest.raises(EventDecodeError):
        decode_event_batch(payload)
