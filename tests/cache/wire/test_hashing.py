import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from cache.wire.hashing import block_hashes, namespace_seed, prompt_block_hashes

token_lists = st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=200)


def reference(token_ids: list[int], block_size: int, seed: int) -> list[int]:
    """The documented format, written the slow obvious way."""
    out, h = [], seed
    for i in range(len(token_ids) // block_size):
        block = token_ids[i * block_size : (i + 1) * block_size]
        payload = b"".join(t.to_bytes(4, "little") for t in block)
        h = xxhash.xxh3_64_intdigest(payload, seed=h)
        out.append(h)
    return out


def test_namespace_seed_is_pinned() -> None:
    # Pinned value: the format is stable across processes and versions; changing it breaks every index.
    payload = b"prefixgate/kv/v2" + (5).to_bytes(4, "little") + b"llama" + (1).to_bytes(4, "little") + b"t"
    assert namespace_seed("llama", "t") == xxhash.xxh3_64_intdigest(payload)


def test_block_hashes_are_pinned() -> None:
    # Literal values of format v2: a change here silently splits every gateway from every engine's events.
    seed = namespace_seed("m", "t")
    assert seed == 3944849075936600368
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4, seed=seed) == [
        117797104288753289,
        11049090077769773744,
    ]


def test_namespace_separates_models_and_tenants() -> None:
    seeds = {namespace_seed("m"), namespace_seed("m", "a"), namespace_seed("m", "b"), namespace_seed("n")}
    assert len(seeds) == 4
    assert namespace_seed("ab", "c") != namespace_seed("a", "bc")


@given(token_lists, st.sampled_from([1, 4, 16]))
def test_matches_reference_format(tokens: list[int], block_size: int) -> None:
    seed = namespace_seed("model", "salt")
    assert block_hashes(tokens, block_size, seed=seed) == reference(tokens, block_size, seed)
    assert block_hashes(np.array(tokens, dtype=np.int64), block_size, seed=seed) == reference(
        tokens, block_size, seed
    )


def test_only_full_blocks() -> None:
    seed = namespace_seed("m")
    assert block_hashes(list(range(15)), 16, seed=seed) == []
    assert len(block_hashes(list(range(47)), 16, seed=seed)) == 2


@given(token_lists, token_lists)
def test_parent_continues_chain(a: list[int], b: list[int]) -> None:
    seed = namespace_seed("m")
    a = a[: len(a) // 4 * 4]
    first = block_hashes(a, 4, seed=seed)
    rest = block_hashes(b, 4, seed=seed, parent=first[-1] if first else None)
    assert block_hashes(a + b, 4, seed=seed) == first + rest


def test_shared_prefix_shares_hashes_and_diverges_after() -> None:
    seed = namespace_seed("m")
    a = block_hashes([1] * 32 + [2] * 16, 16, seed=seed)
    b = block_hashes([1] * 32 + [3] * 16, 16, seed=seed)
    assert a[:2] == b[:2] and a[2] != b[2]
    assert prompt_block_hashes([1] * 32, "m", "tenant") != a[:2]


@pytest.mark.parametrize("bad", [[-1] * 16, [2**32] * 16])
def test_rejects_ids_outside_u32(bad: list[int]) -> None:
    with pytest.raises((OverflowError, ValueError)):
        block_hashes(bad, 16, seed=0)
    with pytest.raises((OverflowError, ValueError)):
        block_hashes(np.array(bad, dtype=np.int64), 16, seed=0)


def test_tuple_and_uint32_inputs_hash_like_lists() -> None:
    tokens = list(range(40))
    seed = namespace_seed("m")
    expected = block_hashes(tokens, 8, seed=seed)
    assert block_hashes(tuple(tokens), 8, seed=seed) == expected
    assert block_hashes(np.array(tokens, dtype=np.uint32), 8, seed=seed) == expected
    assert (
        block_hashes(np.repeat(np.array(tokens, dtype=np.int32), 2)[::2], 8, seed=seed) == expected
    )  # strided


def test_trailing_zero_ids_are_hashed_in_full() -> None:
    # Blocks are split as fixed-width bytes; a zero id at a block's end must not be trimmed away.
    seed = namespace_seed("m")
    tokens = [7, 0, 0, 0, 0, 0, 0, 0]
    assert block_hashes(tokens, 4, seed=seed) == reference(tokens, 4, seed)
    assert block_hashes([7, 0, 0, 0], 4, seed=seed) != block_hashes([7, 0, 0, 1], 4, seed=seed)
