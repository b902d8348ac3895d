"""Round-trip-safe token vocabulary: random prompts whose text re-encodes to exactly the sampled ids.

A byte-level BPE merges across token boundaries only within one pre-tokenizer chunk, and the
GPT-2-style pre-tokenizer starts a new chunk at every " word". So a sequence of whole-word tokens
that each carry a leading space (``Ġword``), and that each encode alone to themselves, decodes to text
that re-encodes to the same ids. ``separator_ids`` ("\\n\\n", as in SGLang's ``f"{system}\\n\\n{question}"``)
keeps that property between two such runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cache.prompt.tokenizer import Tokenizer

SEPARATOR_TEXT = "\n\n"


@dataclass(frozen=True)
class WordVocabulary:
    token_ids: np.ndarray  # [V] int64, each id decodes to " word" and " word" encodes to [id]
    separator_ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, min_letters: int = 2) -> WordVocabulary:
        ids = []
        for token, token_id in tokenizer.backend.get_vocab().items():
            word = token[1:]
            if not (token.startswith("Ġ") and len(word) >= min_letters and word.isascii()):
                continue
            if not (word.isalpha() and word.islower()):
                continue
            if tokenizer.decode([token_id]) == " " + word and tokenizer.encode(" " + word) == [token_id]:
                ids.append(token_id)
        if len(ids) < 1000:
            raise ValueError(
                f"only {len(ids)} round-trip-safe word tokens in this tokenizer; loadgen needs a "
                "byte-level BPE tokenizer with a GPT-2-style pre-tokenizer (Llama 3, Qwen2, SmolLM2, ...)"
            )
        separator = tuple(tokenizer.encode(SEPARATOR_TEXT))
        return cls(np.array(sorted(ids), dtype=np.int64), separator)

    def __len__(self) -> int:
        return len(self.token_ids)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[int, ...]:
        """``n`` ids drawn uniformly with replacement (SGLang's ``gen_prompt`` draws from the vocabulary)."""
        return tuple(int(i) for i in rng.choice(self.token_ids, size=n))

    def sample_distinct_starts(self, rng: np.random.Generator, count: int, n: int) -> list[tuple[int, ...]]:
        """``count`` sequences of ``n`` ids whose first ids all differ, so they share no prefix at all."""
        if count > len(self.token_ids):
            raise ValueError(f"cannot draw {count} distinct first tokens from {len(self.token_ids)}")
        if n == 0:
            return [() for _ in range(count)]
        firsts = rng.choice(self.token_ids, size=count, replace=False)
        return [(int(first), *self.sample(rng, n - 1)) for first in firsts]
