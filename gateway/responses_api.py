"""OpenAI's Responses API at the gateway: ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``.

A request becomes a chat-completions body (``instructions`` as the system message, the chain behind
``previous_response_id`` expanded from the ``ResponseStore``, then ``input``), which is parsed, hashed and
routed like any chat request: a chained request routes to where its whole conversation is cached.
``prompt_cache_retention`` travels in the chat body, where the dispatcher reads it (``gateway.retention``).
Function tools become chat tools; ``function_call`` input items become the assistant's ``tool_calls``
(merged into the assistant message just before them, as the answer that made them is stored) and
``function_call_output`` items ``tool`` messages, so a replayed conversation renders as the chained one. The
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
    """``input`` (a string, or message, ``function_call`` and ``function_call_output`` items) as chat
    messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad_request("'input' must be a string or a non-empty array of input items", "input")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        kind = item.get("type", "message") if isinstance(item, dict) else type(item).__name__
        if kind == "function_call":
            _add_call(messages, item, i)
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", i)
            messages.append({"role": "tool", "tool_call_id": call_id, "content": _text(item, i, "output")})
        elif kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise bad_request(f"input[{i}].role must be one of {', '.join(_ROLES)}", "input")
            messages.append({"role": "system" if role == "developer" else role, "content": _text(item, i)})
        else:
            raise bad_request(
                f"input[{i}]: only message and function call items are supported, not {kind!r}", "input"
            )
    return messages


def _add_call(messages: list[dict[str, Any]], item: dict[str, Any], index: int) -> None:
    """A ``function_call`` item as a chat tool call of the assistant message just before it (a new one
    if there is none)."""
    call = {
        "id": _string(item, "call_id", index),
        "type": "function",
        "function": {"name": _string(item, "name", index), "arguments": _string(item, "arguments", index)},
    }
    if not messages or messages[-1]["role"] != "assistant":
        messages.append({"role": "assistant", "content": None})
    messages[-1]["tool_calls"] = [*messages[-1].get("tool_calls", []), call]


def _string(item: dict[str, Any], name: str, index: int) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise bad_request(f"input[{index}].{name} must be a string", "input")
    return value


def _text(item: dict[str, Any], index: int, name: str = "content") -> str:
    content = item.get(name)
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
    raise bad_request(f"input[{index}].{name} must be a string or an array of text parts", "input")


def chat_body(body: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat-completions body a worker is sent for Responses request ``body`` continuing ``history``
    (the chain's messages, possibly empty)."""
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
    for name in ("model", "stream", "parallel_tool_calls", "prompt_cache_retention", *_SAMPLING):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("tools"):
        chat["tools"] = chat_tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = chat_tool_choice(body["tool_choice"])
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    return chat


def chat_tools(tools: Any) -> list[dict[str, Any]]:
    """Responses function tools (``{"type": "function", "name", "description"?, "parameters"?, "strict"?}``)
    as chat tools; other tool types (hosted search, MCP, ...) are a 400."""
    if not isinstance(tools, list):
        raise bad_request("'tools' must be an array", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise bad_request(f"tools[{i}]: only function tools are supported, not {kind!r}", "tools")
        keys = ("name", "description", "parameters", "strict")
        out.append({"type": "function", "function": {k: tool[k] for k in keys if tool.get(k) is not None}})
    return out


def chat_tool_choice(choice: Any) -> Any:
    """``none``/``auto``/``required`` as they are; ``{"type": "function", "name"}`` as chat's named choice."""
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    if choice in ("none", "auto", "required"):
        return choice
    raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or a function", "tool_choice")


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
