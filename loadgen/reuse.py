"""Reusable fraction: the share of prompt tokens an ideal prefix cache could serve, given arrival order.

The ideal cache has unbounded memory and holds every earlier request's prompt (and, where known, the
prompt followed by its reply, as an engine's radix cache does after decoding). A request can reuse
its longest prefix, in whole blocks of ``block_size`` tokens, that an earlier sequence shares — capped
at ``len(prompt) - 1`` because the last prompt token must be computed to produce logits (vLLM and
SGLang both cap a full hit this way). Comparing the measured cache-hit rate against this number says
how much of the available reuse a routing policy actually captured.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class PrefixBlockSet:
    """Chained hashes of every block-aligned prefix seen so far (a radix tree without the tree)."""

    def __init__(self, block_size: int = 16) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self._prefixes: set[int] = set()

    def _hashes(self, ids: Sequence[int]) -> Iterable[int]:
        h = 0
        for start in range(0, len(ids) - self.block_size + 1, self.block_size):
            h = hash((h, tuple(ids[start : start + self.block_size])))
            yield h

    def match(self, ids: Sequence[int]) -> int:
        """Length of the longest block-aligned prefix of ``ids`` already inserted."""
        matched = 0
        for h in self._hashes(ids):
            if h not in self._prefixes:
                break
            matched += self.block_size
        return matched

    def insert(self, ids: Sequence[int]) -> None:
        self._prefixes.update(self._hashes(ids))


def reusable_tokens(
    prompts: Sequence[Sequence[int]],
    block_size: int = 16,
    replies: Sequence[Sequence[int] | None] | None = None,
) -> list[int]:
    """Per prompt, in the given arrival order: tokens an ideal cache could serve.

    ``replies[i]`` (token ids of the reply to prompt i, or None) is cached as ``prompt + reply``
    after prompt i, so a later chat turn that repeats the history can reuse it.
    """
    cache = PrefixBlockSet(block_size)
    out = []
    for index, prompt in enumerate(prompts):
        out.append(min(cache.match(prompt), max(len(prompt) - 1, 0)))
        cache.insert(prompt)
        reply = replies[index] if replies is not None else None
        if reply:
            cache.insert([*prompt, *reply])
    return out


def reusable_fraction(
    prompts: Sequence[Sequence[int]],
    block_size: int = 16,
    replies: Sequence[Sequence[int] | None] | None = None,
) -> float:
    total = sum(len(p) for p in prompts)
    return sum(reusable_tokens(prompts, block_size, replies)) / total if total else 0.0
