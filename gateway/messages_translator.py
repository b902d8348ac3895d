"""A worker's chat-completions answer as an Anthropic Messages API answer: the ``message`` object, or its
event stream (``message_start``, ``content_block_start``, ``content_block_delta``..., ``content_block_stop``,
``message_delta``, ``message_stop``); errors in Anthropic's shape.

Content blocks follow the answer in order: its text is a ``text`` block, each tool call a ``tool_use`` block
(``id`` the worker's tool-call id, which the client answers with ``tool_result``; ``input`` its arguments),
and a call makes ``stop_reason`` ``tool_use``. A stream holds one block open at a time, as Anthropic's
does; a call's arguments stream as ``input_json_delta`` while its block is open.

Usage is told truthfully from the worker's ``cached_tokens``: ``cache_read_input_tokens`` = cached;
the rest of the prompt is ``cache_creation_input_tokens`` when the request set ``cache_control`` breakpoints
(the engine caches every full page it computes) and plain ``input_tokens`` otherwise, so the three always
add up to the prompt's tokens.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from aiohttp import web

from cache.api.replies import Usage
from gateway.translation import AnswerPart, ReplyTranslator, ToolCall, sse_event

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error body for ``status``."""
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def message_usage(usage: Usage | None, prompt_tokens: int, breakpoints: bool) -> dict[str, int]:
    """``prompt_tokens``: the gateway's count, used when the worker did not report one."""
    usage = usage or Usage()
    prompt = usage.prompt_tokens if usage.prompt_tokens is not None else prompt_tokens
    cached = min(usage.cached_tokens or 0, prompt)
    return {
        "input_tokens": 0 if breakpoints else prompt - cached,
        "cache_creation_input_tokens": prompt - cached if breakpoints else 0,
        "cache_read_input_tokens": cached,
        "output_tokens": usage.completion_tokens or 0,
    }


class MessagesTranslator(ReplyTranslator):
    """``prompt_tokens``: the gateway's count of the prompt (``message_start`` goes out before the worker
    reports usage); ``breakpoints``: the request set ``cache_control``."""

    def __init__(self, model: str, prompt_tokens: int, breakpoints: bool) -> None:
        super().__init__()
        self.model, self.prompt_tokens, self.breakpoints = model, prompt_tokens, breakpoints
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.blocks: list[int | None] = []  # a stream's content blocks: None for text, else the tool call
        self.open = False  # the last block is open (its content_block_stop not sent)
        self.sent: dict[int, int] = {}  # tool call -> characters of its arguments streamed

    def message(self, content: list[dict[str, Any]] | None) -> dict[str, Any]:
        """The message object; ``content`` None at ``message_start`` (no content, no stop reason yet)."""
        usage = message_usage(self.usage, self.prompt_tokens, self.breakpoints)
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content or [],
            "stop_reason": None if content is None else self._stop_reason(),
            "stop_sequence": None,
            "usage": usage if content is not None else {**usage, "output_tokens": 0},
        }

    def _stop_reason(self) -> str:
        return _STOP_REASONS.get(self.finish_reason or "stop", "end_turn")

    async def reply(self, reply: dict[str, Any]) -> bytes:
        text = self.read_reply(reply)
        content = [{"type": "text", "text": text}] if text or not self.tool_calls else []
        return orjson.dumps(self.message(content + [_tool_use(call) for call in self.tool_calls]))

    def start(self) -> bytes:
        return sse_event("message_start", {"type": "message_start", "message": self.message(None)})

    def chunk(self, chunk: dict[str, Any]) -> bytes:
        return b"".join(self._part(part) for part in self.read_chunk(chunk))

    def _part(self, part: AnswerPart) -> bytes:
        events = []
        if part.call is None:
            if not self.open or self.blocks[-1] is not None:
                events += [self._close(), self._add(None)]
            delta = {"type": "text_delta", "text": part.text}
        else:
            if part.opens:
                events += [self._close(), self._add(part.call)]
            if not part.text or not self.open or self.blocks[-1] != part.call:
                return b"".join(events)  # arguments of a call whose block is closed cannot be streamed
            self.sent[part.call] += len(part.text)
            delta = {"type": "input_json_delta", "partial_json": part.text}
        index = len(self.blocks) - 1
        event = {"type": "content_block_delta", "index": index, "delta": delta}
        return b"".join([*events, sse_event("content_block_delta", event)])

    def _add(self, call: int | None) -> bytes:
        """Open a text block (``call`` None) or the tool call's block."""
        self.blocks.append(call)
        self.open = True
        if call is None:
            block: dict[str, Any] = {"type": "text", "text": ""}
        else:
            self.sent[call] = 0
            block = {**_tool_use(self.tool_calls[call]), "input": {}}
        event = {"type": "content_block_start", "index": len(self.blocks) - 1, "content_block": block}
        return sse_event("content_block_start", event)

    def _close(self) -> bytes:
        """Close the open block, if any (a tool call's arguments not streamed yet go first)."""
        if not self.open:
            return b""
        self.open = False
        index, call = len(self.blocks) - 1, self.blocks[-1]
        events = []
        if call is not None and (rest := self.tool_calls[call].arguments[self.sent[call] :]):
            delta = {"type": "input_json_delta", "partial_json": rest}
            events.append(
                sse_event(
                    "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
                )
            )
        events.append(sse_event("content_block_stop", {"type": "content_block_stop", "index": index}))
        return b"".join(events)

    async def finish(self) -> bytes:
        events = [self._close()]
        if not self.blocks:  # an empty answer is still one (empty) text block
            events += [self._add(None), self._close()]
        delta = {"stop_reason": self._stop_reason(), "stop_sequence": None}
        usage = message_usage(self.usage, self.prompt_tokens, self.breakpoints)
        return b"".join(
            [
                *events,
                sse_event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}),
                sse_event("message_stop", {"type": "message_stop"}),
            ]
        )

    def failed(self, message: str) -> bytes:
        return sse_event("error", anthropic_error(502, message))

    def error(self, status: int, fields: dict[str, Any]) -> web.Response:
        return web.json_response(
            anthropic_error(status, str(fields.get("message") or "error")), status=status
        )


def _tool_use(call: ToolCall) -> dict[str, Any]:
    """A tool call as a ``tool_use`` block; arguments that are not a JSON object read as no input."""
    try:
        arguments = orjson.loads(call.arguments) if call.arguments else {}
    except orjson.JSONDecodeError:
        arguments = {}
    return {
        "type": "tool_use",
        "id": call.call_id,
        "name": call.name,
        "input": arguments if isinstance(arguments, dict) else {},
    }
