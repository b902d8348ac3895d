"""A prompt's size in tokens, bounded from below without tokenizing it: the gateway refuses a prompt that
cannot fit any worker's context before it spends a core on it (a 7.8 MB prompt took 7 s to tokenize).

No token covers more text than the longest vocabulary entry, so a text of ``n`` UTF-8 bytes is at least
``n / bytes_per_token`` tokens. Vocabulary entries are measured in UTF-8 bytes of their *stored* form,
which is never shorter than the text they match (byte-level BPE stores one byte as a 1-2 byte character,
SentencePiece a space as the 3-byte ``▁``); a normalizer may shrink text (NFKC folds ligatures), so then
the bound is divided by ``NORMALIZER_SLACK`` more. Template tokens and fields not counted here only add
tokens: the bound stays a lower one.
"""

from __future__ import annotations

from typing import Any

from cache.api.requests import Kind
from cache.prompt.tokenizer import Tokenizer

NORMALIZER_SLACK = 4


def bytes_per_token(tokenizer: Tokenizer) -> int:
    """An upper bound on the UTF-8 bytes of text one token can match (computed once per tokenizer)."""
    longest = max(len(token.encode()) for token in tokenizer.backend.get_vocab(with_added_tokens=True))
    slack = NORMALIZER_SLACK if tokenizer.backend.normalizer is not None else 1
    return max(1, longest) * slack


def min_prompt_tokens(kind: Kind, body: dict[str, Any], bytes_per_token: int) -> int:
    """A lower bound on the prompt tokens ``parse_request`` would produce from ``body`` (0 when the
    body's shape is wrong: ``parse_request`` reports that)."""
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list):
            return 0
        return sum(_text_tokens(m.get("content"), bytes_per_token) for m in messages if isinstance(m, dict))
    prompt = body.get("prompt") if kind == "completions" else body.get("text", body.get("input_ids"))
    return _text_tokens(prompt, bytes_per_token)


def _text_tokens(value: Any, bytes_per_token: int, depth: int = 0) -> int:
    """Strings count by their bytes, lists of token ids by their length, lists of parts by their sum
    (two levels deep at most: no prompt shape nests further)."""
    if isinstance(value, str):
        return len(value.encode(errors="surrogatepass")) // bytes_per_token
    if depth >= 2:
        return 0
    if isinstance(value, dict):  # a chat content part
        return _text_tokens(value.get("text"), bytes_per_token, depth + 1)
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)
        return sum(_text_tokens(v, bytes_per_token, depth + 1) for v in value)
    return 0
