"""Move one request's bytes to one worker and its answer back to the client, streaming or not.

- ``UpstreamFailed`` means nothing reached the client yet (refused, reset, timed out, 5xx, a stream that
  closed empty): the caller may send the request to another worker.
- Streams pass through line by line with backpressure (each write waits for the client to drain).
- On the way through it reads usage, text and time to first text (``cache.api.replies``), and drops the
  usage-only chunk when the gateway asked for it on the client's behalf (``strip_usage``).
- A worker failing mid-stream ends the client's stream with an error event and ``[DONE]``.
- A client that goes away is never the worker's fault: with handler cancellation (how the gateway runs)
  its handler is cancelled; otherwise the next write fails and ``Relayed.client_gone`` says so. Either
  way leaving ``forward`` closes the upstream connection, which the worker sees as a disconnect and
  aborts (freeing its KV pages).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

import aiohttp
import orjson
from aiohttp import web

from cache.api.errors import ApiError
from cache.api.replies import (
    DONE,
    BadChunk,
    Usage,
    chunk_error,
    chunk_text,
    is_usage_only,
    parse_chunk,
    reply_text,
    reply_usage,
    sse_data,
)
from cache.api.sse import send_error_and_done

UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


class UpstreamFailed(Exception):
    """The worker failed before anything reached the client: another worker may take the request."""


@dataclass(frozen=True)
class UpstreamCall:
    url: str  # the worker's endpoint
    body: bytes
    request_id: str
    received: float  # perf_counter when the gateway got the request: TTFT counts from here
    strip_usage: bool = False  # drop the usage-only chunk: the gateway asked for it, the client did not
    cumulative_text: bool = False  # each chunk carries the whole answer so far (SGLang /generate)


@dataclass
class Relayed:
    """The client's response and what the gateway read on the way through (never the prompt)."""

    response: web.StreamResponse
    status: int
    usage: Usage | None = None
    text: str = ""
    ttft_s: float | None = None
    inter_token_s: list[float] = field(default_factory=list)  # between consecutive chunks with text
    error: str | None = None
    worker_failed: bool = False  # the worker broke off a stream it had started
    client_gone: bool = False  # the client stopped reading before the end


class _ClientGone(Exception):
    pass


class Proxy:
    def __init__(self, session: aiohttp.ClientSession, timeouts: aiohttp.ClientTimeout) -> None:
        self.session, self.timeouts = session, timeouts

    async def forward(self, request: web.Request, call: UpstreamCall) -> Relayed:
        """POST ``call`` upstream and relay the answer to ``request``'s client; raises ``UpstreamFailed``
        only while nothing has been sent to the client."""
        headers = {"Content-Type": "application/json", "X-Request-ID": call.request_id}
        try:
            upstream = await self.session.post(
                call.url, data=call.body, headers=headers, timeout=self.timeouts
            )
        except UPSTREAM_ERRORS as exc:
            raise UpstreamFailed(type(exc).__name__) from exc
        try:
            if upstream.status >= 500:
                raise UpstreamFailed(f"HTTP {upstream.status}: {await _error_detail(upstream)}")
            is_sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
            if upstream.status >= 400 or not is_sse:
                return await _relay_body(upstream)
            return await _relay_stream(request, call, upstream)
        finally:
            upstream.release()  # closes the connection if the body was not read to the end


async def _error_detail(upstream: aiohttp.ClientResponse) -> str:
    try:
        return (await upstream.read())[:200].decode(errors="replace")
    except UPSTREAM_ERRORS as exc:
        return f"(body unreadable: {type(exc).__name__})"


async def _relay_body(upstream: aiohttp.ClientResponse) -> Relayed:
    try:
        raw = await upstream.read()
    except UPSTREAM_ERRORS as exc:
        raise UpstreamFailed(f"failed while reading the answer: {type(exc).__name__}") from exc
    ctype = upstream.headers.get("Content-Type", "application/json").split(";")[0]
    relayed = Relayed(web.Response(body=raw, status=upstream.status, content_type=ctype), upstream.status)
    if upstream.status < 400:
        try:
            reply = orjson.loads(raw)
        except orjson.JSONDecodeError:
            reply = None
        if isinstance(reply, dict):
            relayed.usage, relayed.text = reply_usage(reply), reply_text(reply)
    return relayed


async def _relay_stream(
    request: web.Request, call: UpstreamCall, upstream: aiohttp.ClientResponse
) -> Relayed:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    relayed = Relayed(response, upstream.status)
    texts: list[str] = []
    last_text_at: float | None = None
    started = skip_blank = False
    try:
        while True:
            try:
                line = await upstream.content.readline()
            except UPSTREAM_ERRORS as exc:
                if not started:
                    raise UpstreamFailed(type(exc).__name__) from exc
                relayed.status, relayed.worker_failed = 502, True
                relayed.error = f"worker failed mid-stream: {type(exc).__name__}"
                message = f"the worker failed mid-stream ({type(exc).__name__}); the answer is incomplete"
                await _to_client(send_error_and_done(response, ApiError(502, message)))
                break
            if not line:
                if not started:
                    raise UpstreamFailed("closed the stream without sending anything")
                await _to_client(response.write_eof())
                break
            if not started:
                await _to_client(response.prepare(request))
                started = True
            if skip_blank and not line.strip():
                skip_blank = False
                continue  # the separator after a chunk we dropped
            chunk = _chunk(line)
            if chunk is not None:
                text = chunk_text(chunk)
                if text:
                    now = time.perf_counter()
                    if relayed.ttft_s is None:
                        relayed.ttft_s = now - call.received
                    elif last_text_at is not None:
                        relayed.inter_token_s.append(now - last_text_at)
                    last_text_at = now
                    if call.cumulative_text:
                        texts.clear()
                    texts.append(text)
                relayed.usage = reply_usage(chunk) or relayed.usage
                relayed.error = chunk_error(chunk) or relayed.error
                if call.strip_usage and is_usage_only(chunk):
                    skip_blank = True
                    continue
            await _to_client(response.write(line))
    except _ClientGone:
        relayed.client_gone = True
    relayed.text = "".join(texts)
    return relayed


def _chunk(line: bytes) -> dict | None:
    """The JSON object an SSE line carries, or None (separators, ``[DONE]``, anything unparsable)."""
    payload = sse_data(line)
    if not payload or payload == DONE:
        return None
    try:
        return parse_chunk(payload)
    except BadChunk:
        return None  # relayed as is: judging the worker's stream is the client's business


async def _to_client(write: Awaitable[object]) -> None:
    """Await a write to the client; a client that went away raises ``_ClientGone``, never an upstream error
    (aiohttp reports a closed client transport as ``ClientConnectionResetError``, a ``ClientError``)."""
    try:
        await write
    except ConnectionResetError as exc:
        raise _ClientGone from exc
