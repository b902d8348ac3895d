"""A worker's chat-completions answer as an Anthropic Messages API answer: the ``message`` object, or its
event stream (``message_start``, ``content_block_start``, ``content_block_delta``..., ``content_block_stop``,
``message_delta``, ``message_stop``); errors in Anthropic's shape.

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
from gateway.translation import ReplyTranslator, sse_event

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
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


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

    def message(self, text: str | None) -> dict[str, Any]:
        """The message object; ``text`` None at ``message_start`` (no content, no stop reason yet)."""
        usage = message_usage(self.usage, self.prompt_tokens, self.breakpoints)
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [] if text is None else [{"type": "text", "text": text}],
            "stop_reason": None if text is None else self._stop_reason(),
            "stop_sequence": None,
            "usage": usage if text is not None else {**usage, "output_tokens": 0},
        }

    def _stop_reason(self) -> str:
        return _STOP_REASONS.get(self.finish_reason or "stop", "end_turn")

    async def reply(self, reply: dict[str, Any]) -> bytes:
        return orjson.dumps(self.message(self.read_reply(reply)))

    def start(self) -> bytes:
        block = {"type": "text", "text": ""}
        return sse_event(
            "message_start", {"type": "message_start", "message": self.message(None)}
        ) + sse_event(
            "content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}
        )

    def chunk(self, chunk: dict[str, Any]) -> bytes:
        text = self.read_chunk(chunk)
        if not text:
            return b""
        delta = {"type": "text_delta", "text": text}
        return sse_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})

    async def finish(self) -> bytes:
        delta = {"stop_reason": self._stop_reason(), "stop_sequence": None}
        usage = message_usage(self.usage, self.prompt_tokens, self.breakpoints)
        return b"".join(
            [
                sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
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
