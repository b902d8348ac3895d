"""Forward one request to a worker and relay the answer, streaming or not.

- A worker that fails before the first byte (refused, reset, timed out, 5xx) is retried on another.
- Streams pass through line by line with backpressure (each write waits for the client to drain).
- A client that disconnects cancels this handler; leaving the ``async with`` closes the upstream
  connection, which the worker sees as a disconnect and aborts (freeing its KV pages).
- A worker dying mid-stream ends the client's stream with an error event and ``[DONE]``.
- The worker's usage (``cached_tokens``) is read on the way through for the hit-rate accounting.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
import orjson
from aiohttp import web

from cache.api.errors import ApiError, error_body
from gateway.metrics import GatewayMetrics, RequestRecord
from gateway.policies import Decision
from gateway.router import PreparedRequest, Router
from gateway.workers import Worker, WorkerPool

_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "generate": "/generate"}


class _Retryable(Exception):
    """The worker failed before sending anything: another worker may take the request."""


@dataclass
class _Outcome:
    status: int = 200
    usage: dict | None = None
    text: str = ""
    ttft_s: float | None = None
    error: str | None = None
    last_text_at: float | None = None  # perf_counter of the last streamed chunk with text
    inter_token_s: list[float] = field(default_factory=list)


def _cached_tokens(usage: dict | None) -> int | None:
    if not usage:
        return None
    if "cached_tokens" in usage:  # SGLang meta_info
        return int(usage["cached_tokens"] or 0)
    details = usage.get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0) if "cached_tokens" in details else None


class Proxy:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        router: Router,
        pool: WorkerPool,
        metrics: GatewayMetrics,
        max_retries: int,
        timeouts: aiohttp.ClientTimeout,
    ) -> None:
        self.session, self.router, self.pool, self.metrics = session, router, pool, metrics
        self.max_retries, self.timeouts = max_retries, timeouts

    async def handle(self, request: web.Request, req: PreparedRequest) -> web.StreamResponse:
        tried: set[str] = set()
        body = self._upstream_body(req)
        last_error = "no worker answered"
        for attempt in range(self.max_retries + 1):
            decision = await self.router.choose(req, exclude=tried)
            worker = decision.worker
            outcome = _Outcome()
            try:
                with self.pool.dispatch(worker):
                    response = await self._forward(request, req, worker, body, outcome)
            except _Retryable as exc:
                self.pool.record_failure(worker)
                tried.add(worker.worker_id)
                last_error = f"worker {worker.worker_id}: {exc}"
                if attempt < self.max_retries and len(tried) < len(self.pool.workers):
                    self.metrics.retries.inc()
                    continue
                break
            self._record(req, decision, outcome)
            if outcome.status < 400:
                await self.router.routed(req, worker, outcome.text)
            return response
        raise ApiError(502, f"the request failed on every worker tried ({last_error})")

    def _upstream_body(self, req: PreparedRequest) -> bytes:
        body = dict(req.body)
        if req.tenant.salt:
            body["cache_salt"] = req.tenant.salt  # vLLM's field: the worker keys its cache by it too
        if req.stream and req.kind != "generate":
            # Always ask for usage so cached_tokens can be accounted; stripped again if unasked.
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return orjson.dumps(body)

    async def _forward(
        self, request: web.Request, req: PreparedRequest, worker: Worker, body: bytes, outcome: _Outcome
    ) -> web.StreamResponse:
        headers = {"Content-Type": "application/json", "X-Request-ID": req.request_id}
        try:
            upstream = await self.session.post(
                worker.url + _PATHS[req.kind], data=body, headers=headers, timeout=self.timeouts
            )
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _Retryable(type(exc).__name__) from exc
        try:
            if upstream.status >= 500:
                detail = (await upstream.read())[:200].decode(errors="replace")
                raise _Retryable(f"HTTP {upstream.status}: {detail}")
            self.pool.record_success(worker)
            outcome.status = upstream.status
            is_sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
            if upstream.status >= 400 or not is_sse:
                return await self._relay_body(upstream, outcome)
            return await self._relay_stream(request, req, worker, upstream, outcome)
        finally:
            upstream.release()  # closes the connection if the body was not read to the end

    async def _relay_body(self, upstream: aiohttp.ClientResponse, outcome: _Outcome) -> web.Response:
        try:
            raw = await upstream.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _Retryable(f"failed while reading the answer: {type(exc).__name__}") from exc
        if upstream.status < 400:
            try:
                data = orjson.loads(raw)
                outcome.usage = data.get("usage") or data.get("meta_info")
                outcome.text = _reply_text(data)
            except (orjson.JSONDecodeError, AttributeError):
                pass
        ctype = upstream.headers.get("Content-Type", "application/json")
        return web.Response(body=raw, status=upstream.status, content_type=ctype.split(";")[0])

    async def _relay_stream(
        self,
        request: web.Request,
        req: PreparedRequest,
        worker: Worker,
        upstream: aiohttp.ClientResponse,
        outcome: _Outcome,
    ) -> web.StreamResponse:
        wants_usage = bool((req.body.get("stream_options") or {}).get("include_usage"))
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        started = skip_blank = False
        texts: list[str] = []
        try:
            async for line in upstream.content:
                if not started:
                    await response.prepare(request)
                    started = True
                if skip_blank and line.strip() == b"":
                    skip_blank = False
                    continue  # the separator after a chunk we dropped
                if line.startswith(b"data: {"):
                    chunk = orjson.loads(line[6:])
                    text = _chunk_text(chunk)
                    if text:
                        now = time.perf_counter()
                        if outcome.ttft_s is None:
                            outcome.ttft_s = now - req.received
                        elif outcome.last_text_at is not None:
                            outcome.inter_token_s.append(now - outcome.last_text_at)
                        outcome.last_text_at = now
                    texts.append(text)
                    usage = chunk.get("usage") or chunk.get("meta_info")
                    if usage:
                        outcome.usage = usage
                    if (
                        chunk.get("usage")
                        and not chunk.get("choices")
                        and not wants_usage
                        and req.kind != "generate"
                    ):
                        skip_blank = True
                        continue  # the usage chunk we asked for on the client's behalf
                    if chunk.get("error"):
                        outcome.error = str(chunk["error"].get("message", "error"))
                await response.write(line)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if not started:
                raise _Retryable(type(exc).__name__) from exc
            self.pool.record_failure(worker)
            outcome.status, outcome.error = 502, f"worker failed mid-stream: {type(exc).__name__}"
            message = f"the worker failed mid-stream ({type(exc).__name__}); the answer is incomplete"
            await response.write(b"data: " + orjson.dumps(error_body(502, message)) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
        if not started:
            raise _Retryable("closed the stream without sending anything")
        outcome.text = "".join(texts) if req.kind != "generate" else (texts[-1] if texts else "")
        await response.write_eof()
        return response

    def _record(self, req: PreparedRequest, decision: Decision, outcome: _Outcome) -> None:
        usage = outcome.usage or {}
        latency_s = time.perf_counter() - req.received
        completion_tokens = int(usage.get("completion_tokens") or 0)
        self.metrics.record(
            RequestRecord(
                time=time.time(),
                request_id=req.request_id,
                tenant=req.tenant.name,
                worker=decision.worker.worker_id,
                policy=self.router.policy.name,
                reason=decision.reason,
                status=outcome.status,
                stream=req.stream,
                prompt_tokens=int(usage.get("prompt_tokens") or len(req.prompt_ids)),
                predicted_cached_tokens=decision.predicted_cached_tokens,
                cached_tokens=_cached_tokens(usage),
                completion_tokens=completion_tokens,
                ttft_s=outcome.ttft_s,
                latency_s=latency_s,
                error=outcome.error,
                tpot_s=RequestRecord.time_per_output_token(outcome.ttft_s, latency_s, completion_tokens),
            ),
            outcome.inter_token_s,
        )


def _chunk_text(chunk: dict) -> str:
    if "text" in chunk and "choices" not in chunk:  # SGLang /generate: cumulative text
        return chunk.get("text") or ""
    parts = []
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        parts.append((delta or {}).get("content") or "" if delta is not None else choice.get("text") or "")
    return "".join(parts)


def _reply_text(data: dict) -> str:
    if "text" in data and "choices" not in data:
        return data.get("text") or ""
    choice = (data.get("choices") or [{}])[0]
    message = choice.get("message")
    return (message or {}).get("content") or "" if message is not None else choice.get("text") or ""
