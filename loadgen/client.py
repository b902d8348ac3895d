"""One streamed OpenAI request -> a ``RequestRecord`` holding its raw event timeline.

Times are ``time.perf_counter()`` seconds; the record stores them relative to the benchmark start
(``send_s``, ``scheduled_s``) and to the request's own send time (chunk offsets), so metrics are pure
arithmetic over records (``metrics.py``) and tests can build timelines by hand.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from cache.api.replies import (
    DONE,
    BadChunk,
    Usage,
    chunk_error,
    chunk_text,
    parse_chunk,
    reply_usage,
    sse_data,
)

MAX_ERROR_BODY_CHARS = 2000


@dataclass
class RequestRecord:
    request_id: int
    conversation_id: str = ""
    turn_index: int = 0
    group: int | None = None
    session_id: str | None = None
    warmup: bool = False
    scheduled_s: float | None = None  # intended send time (open loop); None in a closed loop
    dispatch_s: float | None = None  # when the client got round to it, before any concurrency slot wait
    send_s: float = 0.0  # just before the HTTP request is written
    chunk_offsets_s: list[float] = field(default_factory=list)  # each SSE data event, from send_s
    chunk_has_content: list[bool] = field(default_factory=list)  # non-empty text / delta.content
    end_offset_s: float | None = None  # last SSE line ([DONE] included), from send_s
    http_status: int | None = None
    success: bool = False
    error: str = ""
    usage_output_tokens: int | None = None  # usage.completion_tokens
    prompt_tokens: int | None = None  # usage.prompt_tokens
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens
    kv_fetched_tokens: int | None = None  # of those, fetched from a peer worker (our engine's usage)
    generated_text: str = ""
    expected_prompt_tokens: int | None = None  # filled after the run from the rendered prompt
    reusable_tokens: int | None = None  # what an ideal prefix cache could serve (reuse.py)

    @property
    def lateness_s(self) -> float | None:
        """How late the client dispatched this request against its precomputed schedule."""
        if self.scheduled_s is None or self.dispatch_s is None:
            return None
        return self.dispatch_s - self.scheduled_s

    @property
    def content_offsets_s(self) -> list[float]:
        return [t for t, has in zip(self.chunk_offsets_s, self.chunk_has_content, strict=True) if has]

    @property
    def ttft_s(self) -> float | None:
        """SGLang: time to the first chunk whose text is non-empty (role-only and usage chunks don't count)."""
        content = self.content_offsets_s
        return content[0] if content else None

    @property
    def itl_s(self) -> list[float]:
        """SGLang: gaps between consecutive non-empty content chunks (a chunk may carry several tokens)."""
        content = self.content_offsets_s
        return [b - a for a, b in itertools.pairwise(content)]

    @property
    def latency_s(self) -> float | None:
        """SGLang: time to the stream's last line ([DONE] and the usage chunk included)."""
        return self.end_offset_s

    @property
    def output_tokens(self) -> int:
        """usage.completion_tokens; without usage, the number of content chunks (one token each, at best)."""
        if self.usage_output_tokens is not None:
            return self.usage_output_tokens
        return sum(self.chunk_has_content)

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "conversation_id": self.conversation_id,
            "turn_index": self.turn_index,
            "group": self.group,
            "session_id": self.session_id,
            "warmup": self.warmup,
            "success": self.success,
            "http_status": self.http_status,
            "error": self.error,
            "scheduled_s": self.scheduled_s,
            "send_s": self.send_s,
            "lateness_s": self.lateness_s,
            "ttft_s": self.ttft_s,
            "latency_s": self.latency_s,
            "output_tokens": self.output_tokens if self.success else 0,
            "usage_output_tokens": self.usage_output_tokens,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "kv_fetched_tokens": self.kv_fetched_tokens,
            "expected_prompt_tokens": self.expected_prompt_tokens,
            "reusable_tokens": self.reusable_tokens,
            "chunk_offsets_s": self.chunk_offsets_s,
            "chunk_has_content": self.chunk_has_content,
        }


def _read_usage(record: RequestRecord, usage: Usage) -> None:
    if usage.completion_tokens is not None:
        record.usage_output_tokens = usage.completion_tokens
    if usage.prompt_tokens is not None:
        record.prompt_tokens = usage.prompt_tokens
    if usage.cached_tokens is not None:
        record.cached_tokens = usage.cached_tokens
    if usage.kv_fetch is not None:
        record.kv_fetched_tokens = usage.kv_fetch.tokens


async def stream_request(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    record: RequestRecord,
    origin_s: float,
) -> RequestRecord:
    """POST ``body`` and read its SSE stream into ``record``; never raises for HTTP or stream errors.

    ``origin_s`` is the benchmark start (perf_counter) that ``record.send_s`` is measured from.
    """
    text_parts: list[str] = []
    start = time.perf_counter()
    record.send_s = start - origin_s
    try:
        async with session.post(url, data=body, headers=headers) as response:
            record.http_status = response.status
            if response.status != 200:
                raw = await response.read()
                record.error = (
                    f"HTTP {response.status}: {raw.decode('utf-8', 'replace')[:MAX_ERROR_BODY_CHARS]}"
                )
                record.end_offset_s = time.perf_counter() - start
                return record
            async for line in response.content:
                now = time.perf_counter() - start
                payload = sse_data(line)
                if payload is None:
                    continue  # blank separators, ": ping" comments, event:/id: fields
                record.end_offset_s = now
                if payload == DONE:
                    continue
                data = parse_chunk(payload)
                error = chunk_error(data)
                if error is not None:
                    record.error = f"stream error: {error[:MAX_ERROR_BODY_CHARS]}"
                    return record
                text = chunk_text(data)
                record.chunk_offsets_s.append(now)
                record.chunk_has_content.append(bool(text))
                if text:
                    text_parts.append(text)
                usage = reply_usage(data)
                if usage is not None:
                    _read_usage(record, usage)
        record.generated_text = "".join(text_parts)
        if not any(record.chunk_has_content):
            record.error = "the stream ended without a chunk of non-empty content"
        else:
            record.success = True
    except (aiohttp.ClientError, asyncio.TimeoutError, BadChunk, UnicodeDecodeError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        record.end_offset_s = time.perf_counter() - start
    return record
