"""OpenAI's Responses API at the gateway: ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``.

A request becomes a chat-completions body (``instructions`` as the system message, the chain behind
``previous_response_id`` expanded from the ``ResponseStore``, then ``input``), which is parsed, hashed and
routed like any chat request: a chained request routes to where its whole conversation is cached. The
worker's answer comes back through ``ResponsesTranslator``; stored responses are written before the client
sees the end of the answer, so a client may chain on it at once, on any replica.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from aiohttp import web

from cache.api.errors import ApiError, bad_request
from gateway.handlers import prepare, read_request
from gateway.response_store import ResponseStore
from gateway.responses_translator import ResponsesTranslator
from gateway.state import STATE
from gateway.tenancy import authenticate

RESPONSE_STORE = web.AppKey("response_store", ResponseStore)

_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text", "text")
# Accepted and forwarded as chat fields of the same meaning.
_SAMPLING = ("temperature", "top_p")


def input_messages(value: Any) -> list[dict[str, Any]]:
    """``input`` (a string, or message items whose content is a string or text parts) as chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad_request("'input' must be a string or a non-empty array of message items", "input")
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            kind = item.get("type") if isinstance(item, dict) else type(item).__name__
            raise bad_request(f"input[{i}]: only message items are supported, not {kind!r}", "input")
        role = item.get("role")
        if role not in _ROLES:
            raise bad_request(f"input[{i}].role must be one of {', '.join(_ROLES)}", "input")
        messages.append({"role": "system" if role == "developer" else role, "content": _text(item, i)})
    return messages


def _text(item: dict[str, Any], index: int) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
                raise bad_request(f"input[{index}].content: only text parts are supported", "input")
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"input[{index}].content: a text part needs a string 'text'", "input")
            texts.append(text)
        return "".join(texts)
    raise bad_request(f"input[{index}].content must be a string or an array of text parts", "input")


def chat_body(body: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat-completions body a worker is sent for Responses request ``body`` continuing ``history``
    (the chain's messages, possibly empty)."""
    if body.get("tools"):
        raise bad_request("tools are not supported on /v1/responses at this gateway", "tools")
    text_format = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if text_format not in (None, {"type": "text"}):
        raise bad_request("only text.format {'type': 'text'} is supported", "text")
    if body.get("truncation") not in (None, "disabled"):
        raise bad_request("only truncation 'disabled' is supported", "truncation")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad_request("'instructions' must be a string", "instructions")
    if "input" not in body:
        raise bad_request("'input' is required", "input")
    system = [{"role": "system", "content": instructions}] if instructions else []
    chat: dict[str, Any] = {"messages": system + history + input_messages(body["input"])}
    for name in ("model", "stream", *_SAMPLING):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    return chat


async def create_response(request: web.Request) -> web.StreamResponse:
    state, tenant, body = await read_request(request)
    store = request.app[RESPONSE_STORE]
    previous_id = body.get("previous_response_id")
    history: list[dict[str, Any]] = []
    if previous_id is not None:
        if not isinstance(previous_id, str):
            raise bad_request("'previous_response_id' must be a string", "previous_response_id")
        previous = await store.get(tenant.name, previous_id)
        if previous is None:
            raise ApiError(
                404, f"no stored response '{previous_id}'", param="previous_response_id", code="not_found"
            )
        history = previous["messages"]
    save = body.get("store", True)
    if not isinstance(save, bool):
        raise bad_request("'store' must be a boolean", "store")
    session_id = body.get("prompt_cache_key")
    if session_id is not None and not isinstance(session_id, str):
        raise bad_request("'prompt_cache_key' must be a string", "prompt_cache_key")
    chat = chat_body(body, history)
    req = await prepare(request, state, tenant, "chat", chat, session_id=session_id or body.get("user"))
    translator = ResponsesTranslator(
        response_id=f"resp_{uuid.uuid4().hex}",
        request=body,
        model=chat["model"],
        created_at=int(time.time()),
        conversation=chat["messages"][1:] if body.get("instructions") else chat["messages"],
        save=(lambda response_id, record: store.put(tenant.name, response_id, record)) if save else None,
    )
    return await state.dispatcher.dispatch(request, req, translator)


async def get_response(request: web.Request) -> web.Response:
    tenant = authenticate(request, request.app[STATE].config.api_keys)
    response_id = request.match_info["response_id"]
    record = await request.app[RESPONSE_STORE].get(tenant.name, response_id)
    if record is None:
        raise ApiError(404, f"no stored response '{response_id}'", code="not_found")
    return web.json_response(record["response"])


async def delete_response(request: web.Request) -> web.Response:
    tenant = authenticate(request, request.app[STATE].config.api_keys)
    response_id = request.match_info["response_id"]
    if not await request.app[RESPONSE_STORE].delete(tenant.name, response_id):
        raise ApiError(404, f"no stored response '{response_id}'", code="not_found")
    return web.json_response({"id": response_id, "object": "response.deleted", "deleted": True})
