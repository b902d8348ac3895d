"""Tool calls in a chat answer, in OpenAI's chat-completions shape (the engine's side of tools).

A request with tools whose template names a tool-call format (``GenerationRequest.tool_parser``) has its
answer fed through that family's parser (``cache.prompt.tool_calls``): whole, into the message's
``content`` and ``tool_calls``; streamed, into ``content`` deltas and one ``tool_calls`` delta per call
(each call whole: its id, name and complete arguments). ``finish_reason`` is ``tool_calls`` when the
model called a tool and stopped by itself. Text that is not a well-formed call stays content.
"""

from __future__ import annotations

import uuid
from typing import Any

from cache.prompt.tool_calls import Piece, ToolCall, new_parser, split_pieces


def tool_call_json(call: ToolCall) -> dict[str, Any]:
    """One call as OpenAI writes it, with a fresh id the client answers with ``tool_call_id``."""
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def finish_reason(reason: str | None, called: bool) -> str | None:
    """``tool_calls`` for an answer that called a tool and ended by itself; otherwise as the engine said."""
    return "tool_calls" if called and reason == "stop" else reason


def apply_tool_calls(choice: dict[str, Any], parser: str) -> dict[str, Any]:
    """A whole chat choice (``message.content`` the model's text) with its tool calls parsed out."""
    text = choice["message"]["content"] or ""
    content, calls = split_pieces(new_parser(parser).parse(text))
    if not calls:
        return choice
    message = {
        **choice["message"],
        "content": content or None,
        "tool_calls": [tool_call_json(c) for c in calls],
    }
    return {**choice, "message": message, "finish_reason": finish_reason(choice["finish_reason"], True)}


class ToolCallStream:
    """One streamed choice's text deltas -> chat deltas: ``{"content": ...}`` or ``{"tool_calls": [...]}``.
    ``feed`` every text delta, ``finish`` once at the end, then ``finish_reason``."""

    def __init__(self, parser: str) -> None:
        self._parser = new_parser(parser)
        self.calls = 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        return [self._delta(p) for p in self._parser.feed(text)]

    def finish(self) -> list[dict[str, Any]]:
        return [self._delta(p) for p in self._parser.finish()]

    def finish_reason(self, reason: str | None) -> str | None:
        return finish_reason(reason, self.calls > 0)

    def _delta(self, piece: Piece) -> dict[str, Any]:
        if piece.call is None:
            return {"content": piece.text}
        self.calls += 1
        return {"tool_calls": [{"index": self.calls - 1, **tool_call_json(piece.call)}]}
