"""OpenAI choices from the engine's chunks: each choice's text, finish reason and logprobs (n >= 1).

Logprobs are the model's raw distribution (``engine.sampling.TokenLogprobs``). Tokens are named as
vLLM names them: each id decoded alone (special tokens included), ``bytes`` that text's UTF-8, so a
token that ends mid-character reads as U+FFFD. Chat: ``{"content": [{token, logprob, bytes,
top_logprobs: [{token, logprob, bytes}]}]}``. Completions: ``{tokens, token_logprobs, top_logprobs
(token -> logprob, the k most likely plus the sampled one), text_offset}``, offsets counted in the
choice's text from 0 and continued across a stream's chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cache.prompt.tokenizer import Tokenizer
from engine.async_engine import GenerationChunk
from engine.sampling import TokenLogprobs


class TokenTexts:
    """Token id -> its text, decoded once per request (at most the vocabulary, in practice a few)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text


@dataclass
class ChoiceLogprobs:
    """One choice's logprobs in OpenAI's chat or completions shape, block by block."""

    chat: bool
    texts: TokenTexts
    offset: int = 0  # completions: where the next token starts in the choice's text

    def block(self, token_ids: list[int], logprobs: list[TokenLogprobs]) -> dict[str, Any]:
        if self.chat:
            return {"content": [self._chat_entry(t, lp) for t, lp in zip(token_ids, logprobs, strict=True)]}
        tokens = [self.texts(t) for t in token_ids]
        offsets = []
        for text in tokens:
            offsets.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [self._top_dict(t, lp) for t, lp in zip(token_ids, logprobs, strict=True)],
            "text_offset": offsets,
        }

    @staticmethod
    def merge(blocks: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Several blocks of one choice as one (the same keys, lists concatenated)."""
        if not blocks:
            return None
        return {key: [item for b in blocks for item in b[key]] for key in blocks[0]}

    def _chat_entry(self, token_id: int, lp: TokenLogprobs) -> dict[str, Any]:
        text = self.texts(token_id)
        return {
            "token": text,
            "logprob": lp.logprob,
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [
                {"token": (t := self.texts(i)), "logprob": v, "bytes": list(t.encode("utf-8"))}
                for i, v in lp.top
            ],
        }

    def _top_dict(self, token_id: int, lp: TokenLogprobs) -> dict[str, float]:
        top = {self.texts(i): v for i, v in lp.top}
        top.setdefault(self.texts(token_id), lp.logprob)  # OpenAI: the sampled token is always there
        return top


@dataclass
class Choice:
    """One choice of a whole (non-streamed) answer, gathered from its chunks."""

    index: int
    logprobs: ChoiceLogprobs | None
    parts: list[str] = field(default_factory=list)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0

    def add(self, chunk: GenerationChunk) -> None:
        self.parts.append(chunk.text)
        if self.logprobs is not None and chunk.logprobs:
            self.blocks.append(self.logprobs.block(chunk.token_ids, chunk.logprobs))
        self.completion_tokens = chunk.completion_tokens
        if chunk.finished:
            self.finish_reason = chunk.finish_reason

    def reply(self, chat: bool) -> dict[str, Any]:
        logprobs = ChoiceLogprobs.merge(self.blocks)
        if logprobs is None and self.logprobs is not None:  # asked for, no tokens: empty, not absent
            logprobs = self.logprobs.block([], [])
        choice: dict[str, Any] = {
            "index": self.index,
            "logprobs": logprobs,
            "finish_reason": self.finish_reason,
        }
        if chat:
            choice["message"] = {"role": "assistant", "content": "".join(self.parts)}
        else:
            choice["text"] = "".join(self.parts)
        return choice
