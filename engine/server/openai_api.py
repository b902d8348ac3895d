"""OpenAI-compatible endpoints: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

Responses follow OpenAI's shapes; ``usage.prompt_tokens_details.cached_tokens`` reports the prompt
tokens the prefix cache supplied. Streams send the chat role in the first chunk, one chunk per text
delta, a final chunk carrying ``finish_reason``, then (with ``stream_options.include_usage``) a
chunk with empty ``choices`` and the usage, and ``data: [DONE]``.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from typing import Any

from aiohttp import web

from cache.api import sse
from cache.api.errors import ApiError
from cache.api.requests import GenerationRequest, Kind, parse_request, read_json
from engine.async_engine import GenerationChunk
from engine.server.generation import generate_chunks, new_request_id
from engine.server.state import STATE, ServerState


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", retrieve_model)


def _model_card(state: ServerState) -> dict[str, Any]:
    info = state.info
    return {
        "id": info.model_id,
        "object": "model",
        "created": int(state.started),
        "owned_by": "prefixgate",
        "root": info.model_id,
        "max_model_len": info.max_model_len,
    }


def _no_such_model(model: str, served: str) -> ApiError:
    message = f"The model '{model}' does not exist; this engine serves '{served}'"
    return ApiError(404, message, param="model", code="model_not_found")


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request.app[STATE])]})


async def retrieve_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if request.match_info["model"] != state.info.model_id:
        raise _no_such_model(request.match_info["model"], state.info.model_id)
    return web.json_response(_model_card(state))


def parse(state: ServerState, body: dict[str, Any], kind: Kind) -> GenerationRequest:
    """The shared request contract, checked against this engine's limits and model name."""
    model = body.get("model")
    if isinstance(model, str) and model != state.info.model_id:
        raise _no_such_model(model, state.info.model_id)
    return parse_request(kind, body, state.tokenizer, state.info.limits)


def _usage(chunk: GenerationChunk) -> dict[str, Any]:
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": chunk.cached_tokens},
    }


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=False)


async def _serve(request: web.Request, chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    req = parse(state, await read_json(request), "chat" if chat else "completions")
    request_id = new_request_id("chatcmpl-" if chat else "cmpl-")
    head = {
        "id": request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": state.info.model_id,
    }
    endpoint = "chat" if chat else "completions"
    async with aclosing(generate_chunks(state, request_id, req, endpoint)) as chunks:
        first = await anext(chunks)  # errors before the first token are plain HTTP errors
        if not req.stream:
            return await _collect(head, first, chunks, chat)
        return await _stream(request, head, first, chunks, chat, req.include_usage)


async def _collect(head: dict, first: GenerationChunk, chunks: Any, chat: bool) -> web.Response:
    parts, last = [first.text], first
    async for chunk in chunks:
        parts.append(chunk.text)
        last = chunk
    text = "".join(parts)
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": last.finish_reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return web.json_response({**head, "choices": [choice], "usage": _usage(last)})


async def _stream(
    request: web.Request, head: dict, first: GenerationChunk, chunks: Any, chat: bool, include_usage: bool
) -> web.StreamResponse:
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    extra = {"usage": None} if include_usage else {}

    def event(text: str | None, finish_reason: str | None, role: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return {**head, "choices": [choice], **extra}

    response = await sse.open_stream(request)
    if chat:
        await sse.send_event(response, event("", None, role=True))
    last = first
    try:
        chunk: GenerationChunk | None = first
        while chunk is not None:
            last = chunk
            if chunk.text:
                await sse.send_event(response, event(chunk.text, None))
            if chunk.finished:
                break
            chunk = await anext(chunks, None)
    except ApiError as exc:  # the engine failed mid-stream
        await sse.send_error_and_done(response, exc)
        return response
    await sse.send_event(response, event(None, last.finish_reason))
    if include_usage:
        await sse.send_event(response, {**head, "choices": [], "usage": _usage(last)})
    await sse.send_done(response)
    return response
