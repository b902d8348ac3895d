"""SGLang's native generation API: ``/generate`` and ``/abort_request``, shaped as SGLang serves them.

``/generate`` takes ``text`` or ``input_ids``, ``sampling_params`` and ``stream``; it answers
``{"text", "output_ids", "meta_info": {"id", "finish_reason": {"type": ...}, "prompt_tokens",
"completion_tokens", "cached_tokens", "e2e_latency"}}``. Streamed chunks carry the text and ids so
far (cumulative, as SGLang's default), then ``data: [DONE]``; an engine failure mid-stream sends
``data: {"error": {...}}`` before ``[DONE]``, as SGLang does. With ``return_logprob`` (and
``top_logprobs_num``) ``meta_info`` adds ``output_token_logprobs`` and ``output_top_logprobs``, also
cumulative. One choice per request: ``n > 1`` is an OpenAI-route feature here.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from typing import Any

from aiohttp import web

from cache.api import sse
from cache.api.errors import ApiError, bad_request
from cache.api.fields import get_bool, read_json
from cache.api.requests import GenerationRequest, parse_request
from engine.async_engine import GenerationChunk
from engine.sampling import TokenLogprobs
from engine.server.choices import TokenTexts
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
    logprobs: list[TokenLogprobs] | None = None,
    texts: TokenTexts | None = None,
) -> dict[str, Any]:
    meta = {
        "id": rid,
        "finish_reason": _finish_reason(state, req, chunk, ids),
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "cached_tokens": chunk.cached_tokens,
        "e2e_latency": time.perf_counter() - start,
    }
    if chunk.kv_fetch is not None:  # as in the OpenAI usage (cache.api.replies.KVFetch)
        meta.update(kv_fetched_tokens=chunk.kv_fetch.tokens, kv_fetch_seconds=chunk.kv_fetch.seconds)
    if logprobs is not None:
        meta.update(_logprobs(ids, logprobs, texts))
    return {"text": text, "output_ids": list(ids), "meta_info": meta}


def _logprobs(ids: list[int], logprobs: list[TokenLogprobs], texts: TokenTexts | None) -> dict[str, Any]:
    """SGLang's ``return_logprob`` fields: ``[logprob, token id, text or None]`` per output token and
    per top token (text with ``return_text_in_logprobs``). Prompt logprobs are not computed."""

    def entry(logprob: float, token: int) -> list[Any]:
        return [logprob, token, texts(token) if texts else None]

    return {
        "input_token_logprobs": [],
        "input_top_logprobs": [],
        "output_token_logprobs": [entry(lp.logprob, t) for t, lp in zip(ids, logprobs, strict=True)],
        "output_top_logprobs": [[entry(v, i) for i, v in lp.top] for lp in logprobs],
    }


async def generate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    start = time.perf_counter()
    body = await read_json(request)
    req = parse_request("generate", body, state.tokenizer, state.info.limits)
    rid = req.rid or new_request_id("")
    # return_logprob: the log-probabilities so far, cumulative like the text
    logprobs: list[TokenLogprobs] | None = [] if req.sampling.logprobs is not None else None
    texts = TokenTexts(state.tokenizer) if get_bool(body, "return_text_in_logprobs") else None

    def output(chunk: GenerationChunk) -> dict[str, Any]:
        return _output(state, rid, req, chunk, text, ids, start, logprobs, texts)

    async with aclosing(generate_chunks(state, rid, req, "generate")) as chunks:
        chunk = await anext(chunks)  # errors before the first token are plain HTTP errors
        text, ids = chunk.text, list(chunk.token_ids)
        if logprobs is not None:
            logprobs.extend(chunk.logprobs or [])
        if not req.stream:
            async for chunk in chunks:
                text += chunk.text
                ids.extend(chunk.token_ids)
                if logprobs is not None:
                    logprobs.extend(chunk.logprobs or [])
            return web.json_response(output(chunk))
        response = await sse.open_stream(request)
        try:
            while True:
                if chunk.text or chunk.finished:
                    await sse.send_event(response, output(chunk))
                if chunk.finished:
                    break
                chunk = await anext(chunks)
                text += chunk.text
                ids.extend(chunk.token_ids)
                if logprobs is not None:
                    logprobs.extend(chunk.logprobs or [])
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
