"""Tokenizer endpoints: vLLM's ``/v1/tokenize`` and ``/v1/detokenize``, SGLang's ``/tokenize`` and
``/detokenize``.

Both tokenize routes take a text prompt (SGLang's: also a list of them) or chat ``messages`` (with
``tools``), rendered exactly as the chat route renders them (``cache.api.requests``), so the count is
the prompt a chat request with these messages costs. The answers differ where the two servers' do:
vLLM's detokenize answers ``{"prompt"}`` and keeps special tokens by default, SGLang's ``{"text"}`` and
skips them. Tokenizing runs off the event loop: a body may hold megabytes of text.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from cache.api.errors import ApiError, bad_request
from cache.api.fields import get_bool, get_token_ids, read_json
from cache.api.requests import chat_prompt_ids
from cache.api.tools import get_tools
from cache.prompt.tokenizer import Tokenizer
from engine.server.state import STATE, ServerState


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/tokenize", tokenize)
    r.add_post("/tokenize", tokenize)
    r.add_post("/v1/detokenize", detokenize_vllm)
    r.add_post("/detokenize", detokenize_sglang)


async def _body(request: web.Request) -> tuple[ServerState, dict[str, Any]]:
    state = request.app[STATE]
    body = await read_json(request)
    model = body.get("model")
    if model is not None and model != state.info.model_id:
        message = f"The model '{str(model)[:100]}' does not exist; this engine serves '{state.info.model_id}'"
        raise ApiError(404, message, param="model", code="model_not_found")
    return state, body


def _chat_ids(tokenizer: Tokenizer, body: dict[str, Any]) -> list[int]:
    """vLLM's chat tokenize request, as far as the chat route renders prompts: with the generation
    prompt, no extra special tokens."""
    if not get_bool(body, "add_generation_prompt", True):
        raise bad_request("only add_generation_prompt=true is supported", "add_generation_prompt")
    if get_bool(body, "continue_final_message"):
        raise bad_request("continue_final_message is not supported", "continue_final_message")
    if get_bool(body, "add_special_tokens"):
        raise bad_request("add_special_tokens is not supported with messages", "add_special_tokens")
    tools = get_tools(body, tokenizer, engine_features=True)
    return chat_prompt_ids(tokenizer, body["messages"], tools.tools)


def _tokenize(tokenizer: Tokenizer, body: dict[str, Any]) -> tuple[Any, Any]:
    """(tokens, count): one list and its length, or (a list of prompts) a list of each."""
    if body.get("messages") is not None:
        tokens = _chat_ids(tokenizer, body)
        return tokens, len(tokens)
    prompt = body.get("prompt", body.get("text"))
    special = get_bool(body, "add_special_tokens", True)
    if isinstance(prompt, str):
        tokens = tokenizer.encode(prompt, add_special_tokens=special)
        return tokens, len(tokens)
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        batch = [tokenizer.encode(p, add_special_tokens=special) for p in prompt]
        return batch, [len(t) for t in batch]
    raise bad_request(
        "'prompt' must be a string or a non-empty list of strings, or give 'messages'", "prompt"
    )


async def tokenize(request: web.Request) -> web.Response:
    """``{"prompt": str | [str], "add_special_tokens"}`` or ``{"messages", "tools"?}``, and
    ``return_token_strs`` -> ``{"count", "max_model_len", "tokens", "token_strs"}``."""
    state, body = await _body(request)
    strs = get_bool(body, "return_token_strs")
    tokens, count = await asyncio.to_thread(_tokenize, state.tokenizer, body)
    answer: dict[str, Any] = {"count": count, "max_model_len": state.info.max_model_len, "tokens": tokens}
    if strs:
        names = state.tokenizer.backend.id_to_token
        answer["token_strs"] = (
            [names(t) for t in tokens] if isinstance(count, int) else [[names(t) for t in s] for s in tokens]
        )
    else:
        answer["token_strs"] = None
    return web.json_response(answer)


async def _decode(request: web.Request, skip_default: bool) -> tuple[list[str], bool]:
    state, body = await _body(request)
    tokens = body.get("tokens")
    skip = get_bool(body, "skip_special_tokens", skip_default)
    batched = isinstance(tokens, list) and bool(tokens) and isinstance(tokens[0], list)
    seqs = [get_token_ids(t, "tokens") for t in tokens] if batched else [get_token_ids(tokens, "tokens")]
    vocab_size = state.info.vocab_size
    if any(t < 0 or t >= vocab_size for s in seqs for t in s):
        raise bad_request(f"token ids must be in [0, {vocab_size})", "tokens")
    decode = state.tokenizer.decode
    texts = await asyncio.to_thread(lambda: [decode(s, skip_special_tokens=skip) for s in seqs])
    return texts, batched


async def detokenize_vllm(request: web.Request) -> web.Response:
    """``{"tokens": [int], "skip_special_tokens": false}`` -> ``{"prompt": str}`` (vLLM's shape)."""
    texts, batched = await _decode(request, skip_default=False)
    if batched:
        raise bad_request("'tokens' must be one list of token ids", "tokens")
    return web.json_response({"prompt": texts[0]})


async def detokenize_sglang(request: web.Request) -> web.Response:
    """``{"tokens": [int] | [[int]], "skip_special_tokens": true}`` -> ``{"text": str | [str]}``."""
    texts, batched = await _decode(request, skip_default=True)
    return web.json_response({"text": texts if batched else texts[0]})
