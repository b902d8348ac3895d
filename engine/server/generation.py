"""One request's trip through the engine, shared by every generating endpoint.

``generate_chunks`` wraps ``AsyncEngine.generate`` with what each API needs around it: engine and
validation failures become ``ApiError``s, metrics are recorded, and ``/abort_request`` can end the
request early. Callers must close it (``contextlib.aclosing``) so that a client that goes away —
aiohttp then cancels the handler task — aborts the request and frees its pages.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from cache.api.errors import ApiError, bad_request
from cache.api.replies import KVFetch
from cache.api.requests import GenerationRequest
from engine.async_engine import EngineError, GenerationChunk
from engine.server.state import ServerState


def new_request_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


async def generate_chunks(
    state: ServerState, request_id: str, req: GenerationRequest, endpoint: str
) -> AsyncIterator[GenerationChunk]:
    """Yield the request's chunks, every choice's (``chunk.index``) interleaved, until each choice has
    had a ``finished`` one. Raises ``ApiError`` only."""
    metrics, tracker = state.metrics, state.tracker
    if state.draining:
        raise ApiError(503, "the engine is shutting down", code="shutting_down")
    tracker.add(request_id)
    start = time.perf_counter()
    last: dict[int, float] = {}  # per choice: when it last gained tokens
    completion: dict[int, int] = {}  # per choice: its tokens so far
    done: set[int] = set()  # choices that finished
    final: GenerationChunk | None = None
    cancelled = False
    fetch: KVFetch | None = None
    try:
        if req.kv_fetch_plan is not None:
            try:
                fetch = await _fetch_prefix(state, req)
            except asyncio.CancelledError:  # the client went away during the fetch
                cancelled = True
                raise
        stream = state.engine.generate(
            req.prompt_ids, req.sampling, request_id, req.cache_salt, kv_pins=req.kv_pins
        )
        try:
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.token_ids:
                    if not last:
                        metrics.time_to_first_token.observe(now - start)
                    elif chunk.index in last:
                        metrics.inter_token_latency.observe((now - last[chunk.index]) / len(chunk.token_ids))
                    last[chunk.index] = now
                completion[chunk.index] = chunk.completion_tokens
                if fetch is not None:  # for usage; the fetched pages are matched as cached ones
                    fetched = min(fetch.tokens, chunk.cached_tokens)
                    chunk = replace(chunk, kv_fetch=replace(fetch, tokens=fetched))
                if chunk.finished:
                    done.add(chunk.index)
                final = replace(chunk, completion_tokens=sum(completion.values()))  # all choices'
                yield chunk
        except asyncio.CancelledError:
            cancelled = True
            if not tracker.was_aborted(request_id):
                raise  # the client went away: closing ``stream`` aborts the request
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            for index in range(req.sampling.n):  # every choice still running ends as aborted
                if index not in done:
                    chunk = _aborted_chunk(request_id, req, final, index, completion.get(index, 0))
                    final = replace(chunk, completion_tokens=sum(completion.values()))
                    yield chunk
        except GeneratorExit:  # the caller stopped early: done, or it went away mid-write
            cancelled = True
            raise
        finally:
            await stream.aclose()
    except ValueError as exc:  # the engine refused the request before queueing it
        raise bad_request(str(exc), req.prompt_param) from None
    except EngineError as exc:
        raise ApiError(503 if state.draining else 500, str(exc), code="engine_error") from None
    finally:
        tracker.remove(request_id)
        metrics.record_request(endpoint, final, time.perf_counter() - start, cancelled)


async def _fetch_prefix(state: ServerState, req: GenerationRequest) -> KVFetch | None:
    """Pull the plan's prefix from its source before the prefill is scheduled. Never fails the
    request: what was not fetched is recomputed (an engine without a transfer service ignores plans).
    Returns what the answer's usage reports of it (None: no fetch ran)."""
    assert req.kv_fetch_plan is not None
    if state.transfer is None:
        state.metrics.record_fetch(None)
        return None
    outcome = await state.transfer.fetch(req.kv_fetch_plan, req.prompt_ids, req.cache_salt)
    state.metrics.record_fetch(outcome)
    return KVFetch(outcome.fetched_tokens, outcome.seconds)


def _aborted_chunk(
    request_id: str, req: GenerationRequest, last: GenerationChunk | None, index: int, completion: int
) -> GenerationChunk:
    cached = last.cached_tokens if last else 0
    return GenerationChunk(request_id, [], "", True, "abort", len(req.prompt_ids), cached, completion, index)
