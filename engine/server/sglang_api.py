"""SGLang's native generation API: ``/generate`` and ``/abort_request``, shaped as SGLang serves them.

``/generate`` takes ``text`` or ``input_ids``, ``sampling_params`` and ``stream``; it answers
``{"text", "output_ids", "meta_info": {"id", "finish_reason": {"type": ...}, "prompt_tokens",
"completion_tokens", "cached_tokens", "e2e_latency"}}``. Streamed chunks carry the text and ids so
far (cumulative, as SGLang's default), then ``data: [DONE]``; an engine failure mid-stream sends
``data: {"error": {...}}`` before ``[DONE]``, as SGLang does.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from typing import Any

from aiohttp import web

from cache.api import sse
from cache.api.errors import ApiError, bad_request
from cache.api.requests import GenerationRequest, get_bool, parse_request, read_json
from engine.async_engine import GenerationChunk
from engine.server.generation import generate_chunks, new_request_id
from engine.server.state import STATE, ServerState


def add_routes(app: web.Application) -> None:
    app.router.add_post("/generate", generate)
    app.router.add_put("/generate", generate)
    app.router.add_post("/abort_request", abort_request)


def _finish_reason(state: ServerState, req: GenerationRequest, chunk: GenerationChunk, ids: list[int]) -> Any:
    if not chunk.finished:
        return None
    if chunk.finish_reason == "length":
        return {"type": "length", "length": chunk.completion_tokens}
    if chunk.finish_reason == "abort":
        return {"type": "abort", "message": "request aborted"}
    stop_ids = set(state.info.eos_token_ids) | set(req.sampling.stop_token_ids)
    matched = ids[-1] if ids and ids[-1] in stop_ids and not req.sampling.ignore_eos else None
    return {"type": "stop", "matched": matched}


def _output(
    state: ServerState,
    rid: str,
    req: GenerationRequest,
    chunk: GenerationChunk,
    text: str,
    ids: list[int],
    start: float,
) -> dict[str, Any]:
    meta = {
        "id": rid,
        "finish_reason": _finish_reason(state, req, chunk, ids),
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "cached_tokens": chunk.cached_tokens,
        "e2e_latency": time.perf_counter() - start,
    }
    return {"text": text, "output_ids": list(ids), "meta_info": meta}


async def generate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    start = time.perf_counter()
    req = parse_request("generate", await read_json(request), state.tokenizer, state.info.limits)
    rid = req.rid or new_request_id("")
    async with aclosing(generate_chunks(state, rid, req, "generate")) as chunks:
        chunk = await anext(chunks)  # errors before the first token are plain HTTP errors
        text, ids = chunk.text, list(chunk.token_ids)
        if not req.stream:
            async for chunk in chunks:
                text += chunk.text
                ids.extend(chunk.token_ids)
            return web.json_response(_output(state, rid, req, chunk, text, ids, start))
        response = await sse.open_stream(request)
        try:
            while True:
                if chunk.text or chunk.finished:
                    await sse.send_event(response, _output(state, rid, req, chunk, text, ids, start))
                if chunk.finished:
                    break
                chunk = await anext(chunks)
                text += chunk.text
                ids.extend(chunk.token_ids)
        except ApiError as exc:
            await sse.send_error_and_done(response, exc)
            return response
        await sse.send_done(response)
        return response


async def abort_request(request: web.Request) -> web.Response:
    """``{"rid": ...}`` or ``{"abort_all": true}``; unknown ids are not an error (the request may be done)."""
    state = request.app[STATE]
    body = await read_json(request)
    if get_bool(body, "abort_all"):
        state.tracker.abort_all()
    elif isinstance(body.get("rid"), str):
        state.tracker.abort(body["rid"])
    else:
        raise bad_request("give 'rid' (a string) or 'abort_all': true", "rid")
    return web.Response(status=200)
