import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cache.index.ops import (
    ApproxOp,
    ClearedOp,
    RemovedOp,
    StoredOp,
    WorkerGoneOp,
    apply_op,
    decode_op,
    encode_op,
    ops_from_event,
)
from cache.index.radix_index import RadixIndex
from cache.index.snapshot import dump_index, load_index
from cache.wire.events import AllBlocksCleared, BlockRemoved, BlockStored
from cache.wire.tiers import Tier
from tests.cache.index.index_model import check_invariants

U64 = st.integers(min_value=0, max_value=2**64 - 1)
ops = st.one_of(
    st.builds(
        StoredOp,
        st.sampled_from(["a", "b"]),
        st.none() | U64,
        st.lists(U64, max_size=4),
        st.sampled_from(list(Tier)),
    ),
    st.builds(RemovedOp, st.sampled_from(["a", "b"]), st.lists(U64, max_size=4), st.sampled_from(list(Tier))),
    st.builds(ClearedOp, st.just("a")),
    st.builds(WorkerGoneOp, st.just("b")),
    st.builds(ApproxOp, st.just("a"), st.none() | U64, st.lists(U64, max_size=4), st.floats(0, 2e9)),
)


@given(ops)
def test_op_codec_round_trips(op: object) -> None:
    assert decode_op(encode_op(op)) == op  # type: ignore[arg-type]


def test_decode_op_rejects_garbage() -> None:
    for bad in (b"\x90", b"\x91\xa1Z", b"\x92\xa1S\x01"):
        with pytest.raises(ValueError):
            decode_op(bad)


def test_events_map_to_ops_with_tiers() -> None:
    assert ops_from_event("w", BlockStored([1], None, [0] * 16, 16, medium="CPU")) == StoredOp(
        "w", None, [1], Tier.HOST
    )
    assert ops_from_event("w", BlockRemoved([1], None)) == RemovedOp("w", [1], Tier.DEVICE)
    assert ops_from_event("w", BlockRemoved([1], "DISK")) == RemovedOp("w", [1], Tier.DISK)
    assert ops_from_event("w", BlockStored([1], None, [0] * 16, 16, medium="CPU_PINNED")).tier is Tier.HOST
    assert ops_from_event("w", AllBlocksCleared()) == ClearedOp("w")


@given(st.lists(ops, max_size=30), st.lists(st.lists(st.integers(0, 5), max_size=5), max_size=5))
def test_snapshot_reproduces_matches(op_list: list, queries: list[list[int]]) -> None:
    index = RadixIndex(clock=lambda: 0.0)
    for i in range(6):  # a few small-hash chains so queries hit something
        index.stored("a" if i % 2 else "b", i - 1 if i else None, [i], Tier.DEVICE)
    for op in op_list:
        apply_op(index, op)
    copy = load_index(dump_index(index), clock=lambda: 0.0)
    check_invariants(copy)
    assert len(copy) == len(index) and copy.stats() == index.stats()
    for q in queries:
        assert copy.match(q) == index.match(q)
    assert list(copy.tier_masks()) == list(index.tier_masks())  # LRU order kept


def test_snapshot_of_an_empty_index_and_inconsistent_columns() -> None:
    assert len(load_index(dump_index(RadixIndex()))) == 0
    index = RadixIndex()
    index.stored("a", None, [1, 2, 3])
    state = msgpack.unpackb(dump_index(index), raw=False)
    state["value_ids"] = state["value_ids"][:-4]  # one block short
    with pytest.raises(ValueError):
        load_index(msgpack.packb(state, use_bin_type=True))
    state["v"] = 1
    with pytest.raises(ValueError, match="version"):
        load_index(msgpack.packb(state, use_bin_type=True))


def test_a_version_2_snapshot_still_loads_without_disk_holders() -> None:
    index = RadixIndex()
    index.stored("a", None, [1, 2, 3])
    index.stored("b", None, [1, 2], Tier.HOST)
    index.insert_approximate("b", None, [7], expires_at=2e9)
    state = msgpack.unpackb(dump_index(index), raw=False)
    state["v"], state["values"] = 2, [value[:2] for value in state["values"]]  # v2: [device, host]
    copy = load_index(msgpack.packb(state, use_bin_type=True))
    check_invariants(copy)
    assert copy.stats() == index.stats() and copy.match([1, 2, 3]) == index.match([1, 2, 3])
    state["values"] = [[1, 0, 0]]  # three masks where v2 has two
    with pytest.raises(ValueError, match="mask per tier"):
        load_index(msgpack.packb(state, use_bin_type=True))
