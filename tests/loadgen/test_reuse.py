"""The ideal-cache reusable fraction on small hand-made prompt sequences."""

from __future__ import annotations

from loadgen.reuse import PrefixBlockSet, reusable_fraction, reusable_tokens


def test_block_aligned_match():
    cache = PrefixBlockSet(block_size=4)
    cache.insert(list(range(10)))
    assert cache.match(list(range(10))) == 8  # the trailing partial block is not a block
    assert cache.match([*range(6), 99, 98]) == 4
    assert cache.match([5, 1, 2, 3]) == 0


def test_arrival_order_and_last_token_cap():
    a = list(range(8))
    b = [*range(6), 50, 51]
    assert reusable_tokens([a, b, a], block_size=2) == [0, 6, 7]  # a full repeat still computes one token
    assert reusable_tokens([b, a], block_size=1) == [0, 6]


def test_replies_extend_the_cached_sequence():
    turn1 = [1, 2, 3, 4]
    reply = [7, 8]
    turn2 = [*turn1, *reply, 9, 9]
    assert reusable_tokens([turn1, turn2], 1) == [0, 4]
    assert reusable_tokens([turn1, turn2], 1, replies=[reply, None]) == [0, 6]
    assert reusable_fraction([turn1, turn2], 1, replies=[reply, None]) == 6 / 12
    assert reusable_fraction([]) == 0.0
