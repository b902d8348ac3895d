"""Move one request's bytes to one worker and its answer back to the client, streaming or not.

- ``UpstreamFailed`` means nothing reached the client yet (refused, reset, timed out, 5xx, a redirect, an
  answer that is not what the API says, a stream that closed empty): the caller may send the request to
  another worker. ``UpstreamFailed.answered`` tells an HTTP 5xx (the worker is up; the request may be
  what failed) from a transport failure.
- Workers are not trusted: redirects are never followed (a 3xx is a failure, the body is never re-POSTed
  elsewhere), a non-streamed answer is read up to ``max_body_bytes``, a 2xx must be JSON or SSE, a 4xx
  reaches the client as an OpenAI error body, a 5xx body never reaches it (it may hold internals: it is
  logged), and a stream line that is too long or not JSON ends the stream with an error event.
- Streams pass through line by line with backpressure (each write waits for the client to drain).
- On the way through it reads usage, text and time to first text (``cache.api.replies``), and drops the
  usage-only chunk when the gateway asked for it on the client's behalf (``strip_usage``).
- A worker failing mid-stream ends the client's stream with an error event and ``[DONE]``.
- With ``UpstreamCall.translator`` (``gateway.translation``) the worker's chat-completions answer is
  translated for the client instead of relayed as is: every check, retry rule and reading above holds
  unchanged; only what is written to the client differs.
- A client that goes away is never the worker's fault: with handler cancellation (how the gateway runs)
  its handler is cancelled; otherwise the next write fails and ``Relayed.client_gone`` says so. Either
  way leaving ``forward`` closes the upstream connection, which the worker sees as a disconnect and
  aborts (freeing its KV pages).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from cache.api.errors import ApiError, error_body
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
from gateway.translation import ReplyTranslator

log = logging.getLogger(__name__)

UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


class UpstreamFailed(Exception):
    """The worker failed before anything reached the client: another worker may take the request.
    ``answered``: it answered with an HTTP 5xx (alive; maybe this request's fault), not a broken transport.
    The message is for logs and the gateway's own records, never the worker's body."""

    def __init__(self, message: str, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered


@dataclass(frozen=True)
class UpstreamCall:
    url: str  # the worker's endpoint
    body: bytes
    request_id: str
    received: float  # perf_counter when the gateway got the request: TTFT counts from here
    strip_usage: bool = False  # drop the usage-only chunk: the gateway asked for it, the client did not
    cumulative_text: bool = False  # each chunk carries the whole answer so far (SGLang /generate)
    # Awaited once the worker has accepted the request (a 2xx status), before any byte is relayed.
    on_accepted: Callable[[], Awaitable[None]] | None = None
    translator: ReplyTranslator | None = None  # the client speaks another API than the worker's


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
    worker_failed: bool = False  # the worker broke off (or garbled) a stream it had started
    client_gone: bool = False  # the client stopped reading before the end


class _ClientGone(Exception):
    pass


class Proxy:
    def __init__(
        self, session: aiohttp.ClientSession, timeouts: aiohttp.ClientTimeout, max_body_bytes: int
    ) -> None:
        self.session, self.timeouts, self.max_body_bytes = session, timeouts, max_body_bytes

    async def forward(self, request: web.Request, call: UpstreamCall) -> Relayed:
        """POST ``call`` upstream and relay the answer to ``request``'s client; raises ``UpstreamFailed``
        only while nothing has been sent to the client."""
        headers = {"Content-Type": "application/json", "X-Request-ID": call.request_id}
        try:
            upstream = await self.session.post(
                call.url, data=call.body, headers=headers, timeout=self.timeouts, allow_redirects=False
            )
        except UPSTREAM_ERRORS as exc:
            raise UpstreamFailed(type(exc).__name__) from exc
        try:
            if upstream.status >= 500:
                detail = await self._read(upstream, 200, truncate=True)
                log.warning("%s answered HTTP %d: %r", call.url, upstream.status, detail)
                raise UpstreamFailed(f"HTTP {upstream.status}", answered=True)
            if 300 <= upstream.status < 400:
                raise UpstreamFailed(f"HTTP {upstream.status} redirect (never followed)")
            ctype = upstream.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if upstream.status >= 400:
                fields = _client_error(upstream.status, await self._read(upstream))
                if call.translator is not None:
                    return Relayed(call.translator.error(upstream.status, fields), upstream.status)
                return Relayed(web.json_response({"error": fields}, status=upstream.status), upstream.status)
            if ctype == "text/event-stream":
                if call.on_accepted is not None:
                    await call.on_accepted()
                return await _relay_stream(request, call, upstream)
            relayed = await _reply(upstream.status, await self._read(upstream), call.translator)
            if call.on_accepted is not None:
                await call.on_accepted()
            return relayed
        finally:
            upstream.release()  # closes the connection if the body was not read to the end

    async def call_json(self, url: str, body: bytes, request_id: str) -> dict:
        """POST ``body`` and return the worker's JSON object answer, for a leg of a request the client
        never sees (a disaggregated prefill). Any other answer, a 4xx included, is ``UpstreamFailed``."""
        headers = {"Content-Type": "application/json", "X-Request-ID": request_id}
        try:
            async with self.session.post(
                url, data=body, headers=headers, timeout=self.timeouts, allow_redirects=False
            ) as upstream:
                raw = await self._read(upstream, truncate=upstream.status != 200)
                if upstream.status != 200:
                    log.warning("%s answered HTTP %d: %r", url, upstream.status, raw[:200])
                    raise UpstreamFailed(f"HTTP {upstream.status}", answered=upstream.status >= 500)
        except UPSTREAM_ERRORS as exc:
            raise UpstreamFailed(type(exc).__name__) from exc
        return _json_object(raw)

    async def _read(self, upstream: aiohttp.ClientResponse, limit: int = 0, truncate: bool = False) -> bytes:
        """The body, up to ``limit`` (default ``max_body_bytes``); longer is an ``UpstreamFailed`` unless
        ``truncate``. A body that breaks off is one too."""
        limit = limit or self.max_body_bytes
        try:
            raw = await read_capped(upstream.content, limit + 1)
        except UPSTREAM_ERRORS as exc:
            if truncate:
                return b""
            raise UpstreamFailed(f"failed while reading the answer: {type(exc).__name__}") from exc
        if len(raw) > limit and not truncate:
            raise UpstreamFailed(f"answer larger than {limit} bytes")
        return raw[:limit]


async def read_capped(content: aiohttp.StreamReader, limit: int) -> bytes:
    """At most ``limit`` bytes of a body: until its end, or until ``limit`` (``read(n)`` alone returns
    whatever has arrived, which may be a fraction of the body)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _json_object(raw: bytes) -> dict:
    """A 2xx answer's body, which must be a JSON object (else ``UpstreamFailed``)."""
    try:
        reply = orjson.loads(raw)
    except orjson.JSONDecodeError:
        reply = None
    if not isinstance(reply, dict):
        raise UpstreamFailed("answered something that is not a JSON object")
    return reply


def _client_error(status: int, raw: bytes) -> dict:
    """A worker's 4xx for the client, as OpenAI error fields: its own if it sent an OpenAI error body, else
    ours (never its HTML or other text)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return {k: error.get(k) for k in ("message", "type", "param", "code")}
    return error_body(status, f"the worker refused the request (HTTP {status})")["error"]


async def _reply(status: int, raw: bytes, translator: ReplyTranslator | None) -> Relayed:
    """A non-streamed 2xx answer: a JSON object (translated for the client when asked), or
    ``UpstreamFailed``."""
    reply = _json_object(raw)
    body = await translator.reply(reply) if translator else raw
    relayed = Relayed(web.Response(body=body, status=status, content_type="application/json"), status)
    relayed.usage, relayed.text = reply_usage(reply), reply_text(reply)
    return relayed


async def _relay_stream(
    request: web.Request, call: UpstreamCall, upstream: aiohttp.ClientResponse
) -> Relayed:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    relayed = Relayed(response, upstream.status)
    translator = call.translator
    texts: list[str] = []
    last_text_at: float | None = None
    started = skip_blank = False
    try:
        while True:
            try:
                line = await upstream.content.readline()
                chunk = _chunk(line)
            except (
                *UPSTREAM_ERRORS,
                HttpProcessingError,
                ValueError,
            ) as exc:  # a line past the limit, BadChunk
                failure = f"{type(exc).__name__}: {exc}" if isinstance(exc, BadChunk) else type(exc).__name__
                if not started:
                    raise UpstreamFailed(failure) from exc
                relayed.status, relayed.worker_failed = 502, True
                relayed.error = f"worker failed mid-stream: {failure}"
                log.warning(
                    "request %s: %s failed mid-stream (%s); the client gets an error event",
                    call.request_id,
                    call.url,
                    failure,
                )
                message = "the worker failed mid-stream; the answer is incomplete"
                if translator is not None:
                    await _to_client(response.write(translator.failed(message)))
                    await _to_client(response.write_eof())
                else:
                    await _to_client(send_error_and_done(response, ApiError(502, message)))
                break
            if not line:
                if not started:
                    raise UpstreamFailed("closed the stream without sending anything")
                if translator is not None:
                    await _to_client(response.write(await translator.finish()))
                await _to_client(response.write_eof())
                break
            if not started:
                await _to_client(response.prepare(request))
                started = True
                if translator is not None:
                    await _to_client(response.write(translator.start()))
            if skip_blank and not line.strip():
                skip_blank = False
                continue  # the separator after a chunk we dropped
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
                if translator is not None:
                    events = translator.chunk(chunk)
                    if events:
                        await _to_client(response.write(events))
                    continue
                if call.strip_usage and is_usage_only(chunk):
                    skip_blank = True
                    continue
            if translator is None:
                await _to_client(response.write(line))
    except _ClientGone:
        relayed.client_gone = True
    relayed.text = "".join(texts)
    return relayed


def _chunk(line: bytes) -> dict | None:
    """The JSON object an SSE ``data:`` line carries, or None (separators, comments, ``[DONE]``);
    ``BadChunk`` for a data line that is not a JSON object (the client could not read it either)."""
    payload = sse_data(line)
    if not payload or payload == DONE:
        return None
    return parse_chunk(payload)


async def _to_client(write: Awaitable[object]) -> None:
    """Await a write to the client; a client that went away raises ``_ClientGone``, never an upstream error
    (aiohttp reports a closed client transport as ``ClientConnectionResetError``, a ``ClientError``)."""
    try:
        await write
    except ConnectionResetError as exc:
        raise _ClientGone from exc
