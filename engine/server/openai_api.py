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
from cache.api.errors import ApiError, bad_request
from engine.async_engine import GenerationChunk
from engine.server.generation import generate_chunks, new_request_id
from engine.server.protocol import (
    GenerationRequest,
    chat_prompt_ids,
    check_prompt,
    completion_prompt_ids,
    get_bool,
    get_cache_salt,
    read_json,
    reject_unsupported,
    sampling_from_openai,
)
from engine.server.state import STATE, ServerState


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", retrieve_model)


def _model_card(state: ServerState) -> dict[str, Any]:
    info = state.engine.info
    return {"id": info.model_id, "object": "model", "created": int(state.started), "owned_by": "prefixgate",
            "root": info.model_id, "max_model_len": info.max_model_len}  # fmt: skip


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request.app[STATE])]})


async def retrieve_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if request.match_info["model"] != state.engine.info.model_id:
        raise ApiError(404, f"The model '{request.match_info['model']}' does not exist", param="model",
                       code="model_not_found")  # fmt: skip
    return web.json_response(_model_card(state))


def _parse(state: ServerState, body: dict, chat: bool) -> GenerationRequest:
    model = body.get("model")
    if model is not None and model != state.engine.info.model_id:
        raise ApiError(404, f"The model '{model}' does not exist; this engine serves "
                       f"'{state.engine.info.model_id}'", param="model", code="model_not_found")  # fmt: skip
    reject_unsupported(body, logprob_fields=("logprobs", "top_logprobs") if chat else ("logprobs", "echo"))
    if chat:
        prompt_ids, param = chat_prompt_ids(state.tokenizer, body.get("messages")), "messages"
    else:
        if "prompt" not in body:
            raise bad_request("'prompt' is required", "prompt")
        prompt_ids, param = completion_prompt_ids(state.tokenizer, body["prompt"]), "prompt"
    info = state.engine.info
    check_prompt(prompt_ids, info.max_model_len, state.vocab_size, param)
    stream = get_bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    include_usage = stream and get_bool(options or {}, "include_usage")
    try:
        sampling = sampling_from_openai(body)
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    return GenerationRequest(prompt_ids, sampling, stream, include_usage, get_cache_salt(body))


def _usage(chunk: GenerationChunk) -> dict[str, Any]:
    return {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens,
            "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": chunk.cached_tokens}}  # fmt: skip


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=False)


async def _serve(request: web.Request, chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    req = _parse(state, await read_json(request), chat)
    request_id = new_request_id("chatcmpl-" if chat else "cmpl-")
    head = {"id": request_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": state.engine.info.model_id}  # fmt: skip
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
