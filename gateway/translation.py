"""The proxy's translation hook: one worker answer in chat completions, another API's answer to the client.

Workers speak chat completions; ``/v1/responses`` and ``/v1/messages`` are translated at the gateway. The
request side is plain (a handler builds a chat body and parses it as any chat request, so it is hashed and
routed exactly like one); the answer side goes through a ``ReplyTranslator`` handed to
``Dispatcher.dispatch``, which the proxy calls instead of relaying the worker's bytes. Everything else
(choosing, retrying, recording, usage and text read with ``cache.api.replies``) stays the same path.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from cache.api.replies import Usage, chunk_text, chunk_tool_calls, reply_text, reply_tool_calls, reply_usage


@dataclass
class ToolCall:
    """A tool call in the worker's answer: its id (the worker's, else one made here), the function's name
    and its arguments' JSON text (so far, while streaming)."""

    call_id: str
    name: str
    arguments: str = ""


@dataclass(frozen=True)
class AnswerPart:
    """One step of a streamed answer, in order: answer ``text`` (``call`` None), or a part of the tool
    call ``tool_calls[call]``: its first part ``opens`` it (id and name known), and ``text`` is the next
    piece of its arguments (possibly empty)."""

    text: str = ""
    call: int | None = None
    opens: bool = False


class ReplyTranslator(ABC):
    """Turns one chat-completions answer (a reply, or a stream of chunks) into another API's.

    Invariants the proxy keeps: one instance serves one request; ``reply`` is called at most once (a
    non-streamed 2xx); for a stream, ``start`` once when the first line arrives, then ``chunk`` for every
    JSON ``data:`` chunk in order (the usage-only chunk included), then exactly one of ``finish`` (the
    worker ended the stream) or ``failed`` (it broke off). ``error`` shapes a worker's 4xx. Nothing here
    may raise on a malformed chunk: upstream fields of the wrong type read as absent (``cache.api.replies``).
    ``reply`` and ``finish`` are awaited before the final bytes are written, so whatever they record (a
    stored response) exists by the time the client sees the end of the answer.

    The base class keeps what every API reports from the worker's answer: its usage, finish reason, the
    text so far and its tool calls (``read_reply`` / ``read_chunk``); subclasses shape it.
    """

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self.texts: list[str] = []
        self.tool_calls: list[ToolCall] = []
        self._call_numbers: dict[int, int] = {}  # the worker's tool-call index -> position in tool_calls

    def read_reply(self, reply: dict[str, Any]) -> str:
        """Record a whole reply's usage, finish reason and tool calls; its text."""
        self.usage, self.finish_reason = reply_usage(reply), finish_reason(reply)
        self.tool_calls = [
            ToolCall(call.call_id or new_call_id(), call.name or "", call.arguments)
            for call in reply_tool_calls(reply)
        ]
        return reply_text(reply)

    def read_chunk(self, chunk: dict[str, Any]) -> list[AnswerPart]:
        """Record what one stream chunk adds (usage and finish reason arrive on their own chunks); its
        text and tool-call parts, in order."""
        self.usage = reply_usage(chunk) or self.usage
        self.finish_reason = finish_reason(chunk) or self.finish_reason
        parts = []
        text = chunk_text(chunk)
        if text:
            self.texts.append(text)
            parts.append(AnswerPart(text))
        for delta in chunk_tool_calls(chunk):
            number = self._call_numbers.get(delta.index)
            opens = number is None
            if number is None:
                number = self._call_numbers[delta.index] = len(self.tool_calls)
                self.tool_calls.append(ToolCall(delta.call_id or new_call_id(), delta.name or ""))
            elif not delta.arguments:
                continue
            self.tool_calls[number].arguments += delta.arguments
            parts.append(AnswerPart(delta.arguments, number, opens))
        return parts

    def chat_message(self, text: str) -> dict[str, Any]:
        """The answer as a chat assistant message (what a later turn sends back)."""
        if not self.tool_calls:
            return {"role": "assistant", "content": text}
        calls = [
            {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in self.tool_calls
        ]
        return {"role": "assistant", "content": text or None, "tool_calls": calls}

    @abstractmethod
    async def reply(self, reply: dict[str, Any]) -> bytes:
        """The client's JSON body for a whole chat-completions reply."""

    @abstractmethod
    def start(self) -> bytes:
        """Events that open the client's stream."""

    @abstractmethod
    def chunk(self, chunk: dict[str, Any]) -> bytes:
        """Events for one chat-completions chunk (may be empty)."""

    @abstractmethod
    async def finish(self) -> bytes:
        """Events that close the client's stream once the worker has ended it."""

    @abstractmethod
    def failed(self, message: str) -> bytes:
        """Events that end the client's stream when the worker broke off mid-answer."""

    def error(self, status: int, fields: dict[str, Any]) -> web.Response:
        """A worker's 4xx (``fields``: OpenAI's ``message``, ``type``, ``param``, ``code``) for the client;
        OpenAI's shape unless the API has its own."""
        return web.json_response({"error": fields}, status=status)


def new_call_id() -> str:
    """An id for a tool call whose worker did not name it."""
    return f"call_{uuid.uuid4().hex[:24]}"


def sse_event(name: str, payload: dict[str, Any]) -> bytes:
    """One named server-sent event, as the Responses and Messages APIs frame them."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def finish_reason(reply: dict[str, Any]) -> str | None:
    """The first choice's ``finish_reason`` of a chat reply or chunk (``stop``, ``length``), if any."""
    choices = reply.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        reason = choices[0].get("finish_reason")
        return reason if isinstance(reason, str) else None
    return None
