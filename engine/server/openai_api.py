"""OpenAI-compatible endpoints: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

Responses follow OpenAI's shapes; ``usage.prompt_tokens_details.cached_tokens`` reports the prompt
tokens the prefix cache supplied. Streams send the chat role first (one chunk per choice), one chunk
per text delta of a choice (with ``n > 1`` the choices interleave, each chunk naming its ``index``),
a chunk carrying a choice's ``finish_reason`` when it finishes, then (with
``stream_options.include_usage``) a chunk with empty ``choices`` and the usage, and ``data: [DONE]``.
Logprobs (``engine.server.choices``) ride with the text of their tokens. A chat request with tools whose
template names a tool-call format gets its calls parsed out of the text (``engine.server.tool_replies``):
``message.tool_calls``, or one ``tool_calls`` delta per call, and ``finish_reason`` ``tool_calls``.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from typing import Any

from aiohttp import web

from cache.api import sse
from cache.api.errors import ApiError
from cache.api.fields import read_json
from cache.api.requests import GenerationRequest, Kind, parse_request
from engine.async_engine import GenerationChunk
from engine.server.choices import Choice, ChoiceLogprobs, TokenTexts
from engine.server.generation import generate_chunks, new_request_id
from engine.server.state import STATE, ServerState
from engine.server.tool_replies import ToolCallStream, apply_tool_calls


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


def _usage(first: GenerationChunk, completion_tokens: int) -> dict[str, Any]:
    """The prompt counted once (its pages are shared by every choice), the completions of all choices;
    with a fetch plan, how many cached tokens came from the peer and how long the fetch took
    (``cache.api.replies.KVFetch``)."""
    details: dict[str, Any] = {"cached_tokens": first.cached_tokens}
    if first.kv_fetch is not None:
        details.update(kv_fetched_tokens=first.kv_fetch.tokens, kv_fetch_seconds=first.kv_fetch.seconds)
    return {
        "prompt_tokens": first.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": first.prompt_tokens + completion_tokens,
        "prompt_tokens_details": details,
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
    if req.remote_decode and not req.stream and state.transfer is not None:  # a prefill for a decode worker
        head["kv_transfer_params"] = state.transfer.remote_prefill_params(
            req.prompt_ids, req.cache_salt, request_id, *state.advertised_address
        )
    async with aclosing(generate_chunks(state, request_id, req, endpoint)) as chunks:
        first = await anext(chunks)  # errors before the first token are plain HTTP errors
        logprobs = TokenTexts(state.tokenizer) if req.sampling.logprobs is not None else None
        if not req.stream:
            return await _collect(head, first, chunks, chat, req.sampling.n, logprobs, req.tool_parser)
        return await _stream(request, head, first, chunks, chat, req, logprobs)


async def _collect(
    head: dict,
    first: GenerationChunk,
    chunks: Any,
    chat: bool,
    n: int,
    texts: TokenTexts | None,
    tool_parser: str | None = None,
) -> web.Response:
    choices = [Choice(i, ChoiceLogprobs(chat, texts) if texts else None) for i in range(n)]
    choices[first.index].add(first)
    async for chunk in chunks:
        choices[chunk.index].add(chunk)
    usage = _usage(first, sum(c.completion_tokens for c in choices))
    replies = [c.reply(chat) for c in choices]
    if chat and tool_parser is not None:  # the request has tools: calls out of the text (tool_replies)
        replies = [apply_tool_calls(r, tool_parser) for r in replies]
    return web.json_response({**head, "choices": replies, "usage": usage})


async def _stream(
    request: web.Request,
    head: dict,
    first: GenerationChunk,
    chunks: Any,
    chat: bool,
    req: GenerationRequest,
    texts: TokenTexts | None,
) -> web.StreamResponse:
    """One event per text delta of any choice (choices interleave as their tokens come), each
    choice's finish reason as soon as it finishes; logprobs ride with the text of their tokens."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    extra = {"usage": None} if req.include_usage else {}
    n = req.sampling.n
    logprobs = [ChoiceLogprobs(chat, texts) if texts else None for _ in range(n)]
    pending: list[list[dict[str, Any]]] = [[] for _ in range(n)]  # logprob blocks not sent yet
    completion = [0] * n
    tools = [ToolCallStream(req.tool_parser) for _ in range(n)] if chat and req.tool_parser else None

    def event(
        index: int,
        text: str | None,
        finish_reason: str | None = None,
        role: bool = False,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        blocks, pending[index] = pending[index], []
        choice: dict[str, Any] = {
            "index": index,
            "logprobs": ChoiceLogprobs.merge(blocks),
            "finish_reason": finish_reason,
        }
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            if tool_calls is not None:
                delta["tool_calls"] = tool_calls
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return {**head, "choices": [choice], **extra}

    response = await sse.open_stream(request)
    if chat:
        for index in range(n):
            await sse.send_event(response, event(index, "", role=True))
    try:
        chunk: GenerationChunk | None = first
        while chunk is not None:
            i = chunk.index
            completion[i] = chunk.completion_tokens
            if (lp := logprobs[i]) is not None and chunk.logprobs:
                pending[i].append(lp.block(chunk.token_ids, chunk.logprobs))
            if chunk.text and tools is None:
                await sse.send_event(response, event(i, chunk.text))
            elif tools is not None:  # the request has tools: calls out of the text (tool_replies)
                deltas = tools[i].feed(chunk.text) + (tools[i].finish() if chunk.finished else [])
                for delta in deltas:
                    tool_calls = delta.get("tool_calls")
                    await sse.send_event(response, event(i, delta.get("content"), None, False, tool_calls))
            if chunk.finished:
                reason = chunk.finish_reason if tools is None else tools[i].finish_reason(chunk.finish_reason)
                await sse.send_event(response, event(i, None, reason))
            chunk = await anext(chunks, None)
    except ApiError as exc:  # the engine failed mid-stream
        await sse.send_error_and_done(response, exc)
        return response
    if req.include_usage:
        await sse.send_event(response, {**head, "choices": [], "usage": _usage(first, sum(completion))})
    await sse.send_done(response)
    return response
