"""The proxy's translation hook: one worker answer in chat completions, another API's answer to the client.

Workers speak chat completions; ``/v1/responses`` and ``/v1/messages`` are translated at the gateway. The
request side is plain (a handler builds a chat body and parses it as any chat request, so it is hashed and
routed exactly like one); the answer side goes through a ``ReplyTranslator`` handed to
``Dispatcher.dispatch``, which the proxy calls instead of relaying the worker's bytes. Everything else
(choosing, retrying, recording, usage and text read with ``cache.api.replies``) stays the same path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import orjson
from aiohttp import web

from cache.api.replies import Usage, chunk_text, reply_text, reply_usage


class ReplyTranslator(ABC):
    """Turns one chat-completions answer (a reply, or a stream of chunks) into another API's.

    Invariants the proxy keeps: one instance serves one request; ``reply`` is called at most once (a
    non-streamed 2xx); for a stream, ``start`` once when the first line arrives, then ``chunk`` for every
    JSON ``data:`` chunk in order (the usage-only chunk included), then exactly one of ``finish`` (the
    worker ended the stream) or ``failed`` (it broke off). ``error`` shapes a worker's 4xx. Nothing here
    may raise on a malformed chunk: upstream fields of the wrong type read as absent (``cache.api.replies``).
    ``reply`` and ``finish`` are awaited before the final bytes are written, so whatever they record (a
    stored response) exists by the time the client sees the end of the answer.

    The base class keeps what every API reports from the worker's answer: its usage, finish reason and
    the text so far (``read_reply`` / ``read_chunk``); subclasses shape it.
    """

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self.texts: list[str] = []

    def read_reply(self, reply: dict[str, Any]) -> str:
        """Record a whole reply's usage and finish reason; its text."""
        self.usage, self.finish_reason = reply_usage(reply), finish_reason(reply)
        return reply_text(reply)

    def read_chunk(self, chunk: dict[str, Any]) -> str:
        """Record what one stream chunk adds (usage and finish reason arrive on their own chunks); its text."""
        self.usage = reply_usage(chunk) or self.usage
        self.finish_reason = finish_reason(chunk) or self.finish_reason
        text = chunk_text(chunk)
        if text:
            self.texts.append(text)
        return text

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
