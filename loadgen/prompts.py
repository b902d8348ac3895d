"""Workload turns -> OpenAI request bodies, serialized once with orjson.

Chat endpoint: ``messages`` (system prompt, then user/assistant history, then the new user turn).
Completions endpoint: a raw prompt ``system + SEP + user_1 + SEP + reply_1 + SEP + user_2 ...`` sent
as text (``prompt_format="text"``) or as a list of token ids (``"ids"``; replies are re-encoded).
``server_token_ids`` says which token ids the server will see, for the reuse analysis after a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from cache.prompt.tokenizer import Tokenizer
from loadgen.workloads.base import Conversation, Turn

Endpoint = Literal["chat", "completions"]
PromptFormat = Literal["text", "ids"]
ENDPOINT_PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass(frozen=True)
class RequestOptions:
    endpoint: Endpoint = "chat"
    model: str = "default"
    prompt_format: PromptFormat = "text"
    ignore_eos: bool = True  # as SGLang/vLLM bench_serving: every request generates output_len tokens
    api_key: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RenderedRequest:
    body: bytes
    headers: dict[str, str]
    messages: list[dict[str, str]] | None  # chat
    prompt: str | list[int] | None  # completions
    session_id: str | None


class PromptRenderer:
    """Stateless: the same (conversation, history, turn) always renders the same bytes."""

    def __init__(self, tokenizer: Tokenizer, separator_ids: Sequence[int], options: RequestOptions) -> None:
        self.tokenizer = tokenizer
        self.separator_ids = tuple(separator_ids)
        self.options = options

    def render(
        self, conversation: Conversation, history: Sequence[tuple[Turn, str]], turn: Turn
    ) -> RenderedRequest:
        """``history``: earlier turns of this conversation with the model's reply text to each."""
        opts = self.options
        body: dict[str, Any] = {
            "model": opts.model,
            "max_tokens": turn.output_len,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if opts.ignore_eos:
            body["ignore_eos"] = True
        headers = {"Content-Type": "application/json"}
        if opts.api_key:
            headers["Authorization"] = f"Bearer {opts.api_key}"
        session_id = conversation.session_id
        if session_id is not None:
            body["user"] = session_id
            body["prompt_cache_key"] = session_id
            headers["X-Session-ID"] = session_id
        messages: list[dict[str, str]] | None = None
        prompt: str | list[int] | None = None
        if opts.endpoint == "chat":
            messages = self._messages(conversation, history, turn)
            body["messages"] = messages
        else:
            prompt = self._raw_prompt(conversation, history, turn)
            body["prompt"] = prompt
        body.update(opts.extra_body)
        return RenderedRequest(orjson.dumps(body), headers, messages, prompt, session_id)

    def _messages(
        self, conversation: Conversation, history: Sequence[tuple[Turn, str]], turn: Turn
    ) -> list[dict[str, str]]:
        decode = self.tokenizer.decode
        messages = []
        if conversation.system_ids:
            messages.append({"role": "system", "content": decode(conversation.system_ids)})
        for past, reply in history:
            messages.append({"role": "user", "content": decode(past.user_ids)})
            messages.append({"role": "assistant", "content": reply})
        messages.append({"role": "user", "content": decode(turn.user_ids)})
        return messages

    def _raw_prompt(
        self, conversation: Conversation, history: Sequence[tuple[Turn, str]], turn: Turn
    ) -> str | list[int]:
        segments: list[tuple[int, ...] | str] = []  # ids (workload tokens) or text (model replies)
        if conversation.system_ids:
            segments += [conversation.system_ids, self.separator_ids]
        for past, reply in history:
            segments += [past.user_ids, self.separator_ids, reply, self.separator_ids]
        segments.append(turn.user_ids)
        if self.options.prompt_format == "ids":
            ids: list[int] = []
            for segment in segments:
                ids.extend(self.tokenizer.encode(segment) if isinstance(segment, str) else segment)
            return ids
        if all(not isinstance(s, str) for s in segments):  # one decode keeps byte-level pieces intact
            return self.tokenizer.decode([i for s in segments for i in s])
        return "".join(s if isinstance(s, str) else self.tokenizer.decode(s) for s in segments)

    def server_token_ids(self, rendered: RenderedRequest) -> list[int]:
        """The prompt token ids the server computes for ``rendered`` (chat: template, then encode)."""
        if rendered.messages is not None:
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(rendered.messages))
        if isinstance(rendered.prompt, list):
            return list(rendered.prompt)
        return self.tokenizer.encode(rendered.prompt or "")
