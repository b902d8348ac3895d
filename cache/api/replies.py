"""Replies, SSE chunks and usage, as OpenAI and SGLang servers send them: the one reader of answers.

The gateway's proxy reads usage (``cached_tokens``, and our engine's ``kv_fetched_tokens``) and text on the way through; the load generator
reads the same fields to measure. Both use these functions, so "what a worker reported" means the same
thing on both sides. Upstreams are not trusted: a field of the wrong type reads as absent, never raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

DONE = b"[DONE]"


@dataclass(frozen=True)
class KVFetch:
    """What our engine reports of a fetch plan it ran before the prefill (docs/kv-transfer.md):
    ``prompt_tokens_details.kv_fetched_tokens`` and ``kv_fetch_seconds`` (SGLang's API: the same names in
    ``meta_info``), present only when the request carried a plan; clients that do not know them ignore them."""

    tokens: int  # prompt tokens whose KV came from the peer (they are counted in cached_tokens too)
    seconds: float | None = None  # the fetch's time, success or not; None: not reported


@dataclass(frozen=True)
class Usage:
    """Token counts a worker reported; None where it did not say (or said something that is not a count)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens served from the prefix cache
    kv_fetch: KVFetch | None = None  # the worker fetched part of the prompt's KV from a peer


class BadChunk(ValueError):
    """An SSE ``data:`` line whose payload is neither ``[DONE]`` nor a JSON object."""


def sse_data(line: bytes) -> bytes | None:
    """The payload of an SSE ``data:`` line, or None for blank separators, comments and other fields."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    return line[5:].strip()


def parse_chunk(payload: bytes) -> dict[str, Any]:
    """A ``data:`` payload (not ``[DONE]``) as a JSON object; raises ``BadChunk`` otherwise."""
    try:
        chunk = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise BadChunk(f"not JSON: {exc}") from None
    if not isinstance(chunk, dict):
        raise BadChunk("not a JSON object")
    return chunk


def chunk_text(chunk: dict[str, Any]) -> str:
    """The text a streamed chunk carries: chat ``delta.content``, completions ``text``, or SGLang
    ``/generate``'s ``text`` (cumulative: the whole answer so far)."""
    if "text" in chunk and "choices" not in chunk:
        return _str(chunk.get("text"))
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return ""
    parts = []
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        parts.append(_str(delta.get("content")) if isinstance(delta, dict) else _str(choice.get("text")))
    return "".join(parts)


def reply_text(reply: dict[str, Any]) -> str:
    """The text of a whole (non-streamed) answer: chat, completions or SGLang ``/generate``."""
    if "text" in reply and "choices" not in reply:
        return _str(reply.get("text"))
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    message = choices[0].get("message")
    return _str(message.get("content")) if isinstance(message, dict) else _str(choices[0].get("text"))


@dataclass(frozen=True)
class ToolCallDelta:
    """A part of one tool call in a chat answer (OpenAI's ``tool_calls`` entries). ``index`` tells the
    calls apart; a call's first part names its ``call_id`` and ``name`` (None where the upstream did
    not say), and its ``arguments`` parts concatenate to the arguments' JSON text."""

    index: int
    call_id: str | None
    name: str | None
    arguments: str


def reply_tool_calls(reply: dict[str, Any]) -> list[ToolCallDelta]:
    """The tool calls of a whole chat answer (its first choice's ``message.tool_calls``), each whole."""
    choice = _first_choice(reply)
    message = choice.get("message") if choice else None
    return _tool_calls(message.get("tool_calls")) if isinstance(message, dict) else []


def chunk_tool_calls(chunk: dict[str, Any]) -> list[ToolCallDelta]:
    """The tool-call parts a streamed chat chunk carries (its first choice's ``delta.tool_calls``)."""
    choice = _first_choice(chunk)
    delta = choice.get("delta") if choice else None
    return _tool_calls(delta.get("tool_calls")) if isinstance(delta, dict) else []


def _first_choice(reply: dict[str, Any]) -> dict[str, Any] | None:
    choices = reply.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return None


def _tool_calls(entries: Any) -> list[ToolCallDelta]:
    if not isinstance(entries, list):
        return []
    calls = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        index = _count(entry.get("index"))
        function = entry.get("function") if isinstance(entry.get("function"), dict) else {}
        call_id, name = entry.get("id"), function.get("name")
        calls.append(
            ToolCallDelta(
                position if index is None else index,
                call_id if isinstance(call_id, str) and call_id else None,
                name if isinstance(name, str) and name else None,
                _arguments(function.get("arguments")),
            )
        )
    return calls


def _arguments(value: Any) -> str:
    """Arguments as JSON text (OpenAI's); an upstream that sends the object itself is read alike."""
    return orjson.dumps(value).decode() if isinstance(value, dict) else _str(value)


def chunk_error(chunk: dict[str, Any]) -> str | None:
    """The message of an error event (``{"error": {...}}``) sent inside a stream, else None."""
    error = chunk.get("error")
    if error is None:
        return None
    message = error.get("message") if isinstance(error, dict) else error
    return str(message or "error")


def is_usage_only(chunk: dict[str, Any]) -> bool:
    """OpenAI's final ``stream_options.include_usage`` chunk: usage and no choices."""
    return bool(chunk.get("usage")) and not chunk.get("choices")


def reply_usage(reply: dict[str, Any]) -> Usage | None:
    """Usage of an answer or a chunk: OpenAI ``usage`` or SGLang ``meta_info``; None if it has none."""
    usage = reply.get("usage")
    if isinstance(usage, dict) and usage:
        details = usage.get("prompt_tokens_details")
        details = details if isinstance(details, dict) else {}
        return Usage(
            _count(usage.get("prompt_tokens")),
            _count(usage.get("completion_tokens")),
            _count(details.get("cached_tokens")),
            _kv_fetch(details),
        )
    meta = reply.get("meta_info")
    if isinstance(meta, dict) and meta:
        return Usage(
            _count(meta.get("prompt_tokens")),
            _count(meta.get("completion_tokens")),
            _count(meta.get("cached_tokens")),
            _kv_fetch(meta),
        )
    return None


def _kv_fetch(fields: dict[str, Any]) -> KVFetch | None:
    tokens = _count(fields.get("kv_fetched_tokens"))
    if tokens is None:
        return None
    seconds = fields.get("kv_fetch_seconds")
    valid = isinstance(seconds, int | float) and not isinstance(seconds, bool) and math.isfinite(seconds)
    return KVFetch(tokens, float(seconds) if valid and seconds >= 0 else None)


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""
