"""Anthropic's Messages API at the gateway: ``POST /v1/messages``.

The request becomes a chat-completions body (``system`` as the system message, text blocks joined), parsed,
hashed and routed like any chat request; the answer comes back through ``MessagesTranslator``. Every
error on this route leaves in Anthropic's shape (``{"type": "error", "error": {"type", "message"}}``).

Tools: client tools (``name``, ``description``, ``input_schema``) become chat function tools and
``tool_choice`` its chat equivalent; an assistant's ``tool_use`` blocks become its ``tool_calls`` (``input``
as the arguments' JSON), a user's ``tool_result`` blocks ``tool`` messages (before the turn's text, as
Anthropic requires them first).

``cache_control`` breakpoints (``{"type": "ephemeral", "ttl": "5m" | "1h"}``) are honoured twice. As
session pins: the prefix up to the first breakpoint (the stable part: tools, system prompt, shared
context, in Anthropic's order) names the session, and once a worker has served it the session stays
pinned there for the longest breakpoint ttl, so later requests sharing that prefix go where it is cached.
And as retention pins in our engine workers (``gateway.retention``): the prompt's tokens up to each
breakpoint (the longest common prefix of the prompt and the conversation cut after that block, rendered
and tokenized as the worker does) are held in the worker's cache for that ttl.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import orjson
from aiohttp import web

from cache.api.errors import ApiError, bad_request
from cache.api.requests import chat_prompt_ids
from gateway.handlers import prepare, read_request
from gateway.messages_translator import MessagesTranslator, anthropic_error
from gateway.retention import breakpoint_pins, common_prefix
from gateway.router import Router
from gateway.state import GatewayState
from gateway.workers import Worker

CACHE_TTLS_S = {"5m": 300.0, "1h": 3600.0}
MAX_BREAKPOINTS = 4  # Anthropic's bound on blocks with cache_control
# The content blocks each turn may hold, and their required fields.
_BLOCKS = {"system": ("text",), "user": ("text", "tool_result"), "assistant": ("text", "tool_use")}
_FIELDS: dict[str, dict[str, type]] = {
    "text": {"text": str},
    "tool_use": {"id": str, "name": str, "input": dict},
    "tool_result": {"tool_use_id": str},
}
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def _blocks(value: Any, where: str, role: str) -> list[dict[str, Any]]:
    """A content value (a string, or blocks of the kinds ``role`` may send) as blocks."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if not isinstance(value, list):
        raise bad_request(f"{where} must be a string or an array of content blocks", where)
    for i, block in enumerate(value):
        kind = block.get("type") if isinstance(block, dict) else type(block).__name__
        if kind not in _BLOCKS[role]:
            allowed = " and ".join(_BLOCKS[role])
            raise bad_request(f"{where}[{i}]: only {allowed} blocks are supported here, not {kind!r}", where)
        for name, kind_of in _FIELDS[kind].items():
            if not isinstance(block.get(name), kind_of):
                what = "an object" if kind_of is dict else "a string"
                raise bad_request(f"{where}[{i}].{name} must be {what}", where)
        if kind == "tool_result":
            _result_text(block, f"{where}[{i}].content")
    return value


def _result_text(block: dict[str, Any], where: str) -> str:
    """A ``tool_result``'s content (a string or text blocks) as text."""
    content = block.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list) or not all(
        isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str) for b in content
    ):
        raise bad_request(f"{where} must be a string or an array of text blocks", where)
    return "".join(b["text"] for b in content)


def _chat_messages(role: str, blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One turn's blocks as chat messages: tool results first (``tool``), then the text with any calls."""
    text = "".join(b["text"] for b in blocks if b["type"] == "text")
    if role == "user":
        results = [
            {"role": "tool", "tool_call_id": b["tool_use_id"], "content": _result_text(b, "tool_result")}
            for b in blocks
            if b["type"] == "tool_result"
        ]
        return results + ([{"role": "user", "content": text}] if text or not results else [])
    calls = [
        {"id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": _json(b["input"])}}
        for b in blocks
        if b["type"] == "tool_use"
    ]
    if not calls:
        return [{"role": role, "content": text}]
    return [{"role": role, "content": text or None, "tool_calls": calls}]


def _json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)  # as the engine writes arguments
    except (ValueError, RecursionError):
        raise bad_request("a tool_use input nests too deeply", "messages") from None


def _chat_tools(tools: Any) -> list[dict[str, Any]]:
    """Client tools as chat function tools; server tools (web search, bash, ...) are a 400."""
    if not isinstance(tools, list):
        raise bad_request("'tools' must be an array", "tools")
    out = []
    for i, tool in enumerate(tools):
        if (
            not isinstance(tool, dict)
            or tool.get("type", "custom") != "custom"
            or not isinstance(tool.get("name"), str)
        ):
            raise bad_request(
                f"tools[{i}]: only client tools (name, description, input_schema) are supported", "tools"
            )
        if not isinstance(tool.get("input_schema"), dict):
            raise bad_request(f"tools[{i}].input_schema must be a JSON Schema object", "tools")
        described = {"description": tool["description"]} if tool.get("description") is not None else {}
        function = {"name": tool["name"], **described, "parameters": tool["input_schema"]}
        out.append({"type": "function", "function": function})
    return out


def _chat_tool_choice(choice: Any) -> tuple[Any, bool | None]:
    """Anthropic's ``tool_choice`` as chat's, and ``parallel_tool_calls`` (None: not said)."""
    if not isinstance(choice, dict) or choice.get("type") not in (*_TOOL_CHOICES, "tool"):
        raise bad_request("'tool_choice' must be {'type': 'auto' | 'any' | 'tool' | 'none'}", "tool_choice")
    if choice["type"] == "tool":
        chat_choice: Any = {"type": "function", "function": {"name": choice.get("name")}}
    else:
        chat_choice = _TOOL_CHOICES[choice["type"]]
    disable = choice.get("disable_parallel_tool_use")
    return chat_choice, None if disable is None else not disable


def _ttl_s(block: dict[str, Any], where: str) -> float | None:
    """The block's ``cache_control`` ttl in seconds, None when it has none."""
    control = block.get("cache_control")
    if control is None:
        return None
    if not isinstance(control, dict) or control.get("type") != "ephemeral":
        raise bad_request(f"{where}.cache_control must be {{'type': 'ephemeral'}}", where)
    ttl = control.get("ttl", "5m")
    if ttl not in CACHE_TTLS_S:
        raise bad_request(f"{where}.cache_control.ttl must be '5m' or '1h'", where)
    return CACHE_TTLS_S[ttl]


Turns = list[tuple[str, list[dict[str, Any]]]]  # ("tools" | "system" | "user" | "assistant", blocks)


def _turns(body: dict[str, Any]) -> tuple[Turns, list[dict[str, Any]] | None]:
    """The request's turns in the cache's order (tools, system, messages) and its chat tools."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", "messages")
    tools = body.get("tools") or []
    chat_tools = _chat_tools(tools) if tools else None  # checked before their cache_control is read
    turns: Turns = [("tools", tools)] if tools else []
    if body.get("system") is not None:
        turns.append(("system", _blocks(body["system"], "system", "system")))
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise bad_request(f"messages[{i}].role must be 'user' or 'assistant'", "messages")
        role = message["role"]
        turns.append((role, _blocks(message.get("content"), f"messages[{i}].content", role)))
    return turns, chat_tools


def _chat_of(turns: Turns) -> list[dict[str, Any]]:
    return [m for role, blocks in turns if role != "tools" for m in _chat_messages(role, blocks)]


def breakpoints(body: dict[str, Any]) -> list[tuple[list[dict[str, Any]] | None, float]]:
    """Each ``cache_control`` breakpoint of a request ``translate`` accepted: the chat messages of the
    conversation cut after its block (None for the top-level one: the whole prompt) and its ttl."""
    turns, _ = _turns(body)
    out: list[tuple[list[dict[str, Any]] | None, float]] = []
    for t, (role, blocks) in enumerate(turns):
        for b, block in enumerate(blocks):
            ttl = _ttl_s(block, role)
            if ttl is not None:
                out.append((_chat_of([*turns[:t], (role, blocks[: b + 1])]), ttl))
    ttl = _ttl_s(body, "cache_control")
    if ttl is not None:
        out.append((None, ttl))
    return out


def translate(body: dict[str, Any]) -> tuple[dict[str, Any], str | None, float]:
    """The chat body for a Messages request; the session its first ``cache_control`` breakpoint names
    (None without one) and the longest breakpoint ttl in seconds (0 without one). A top-level
    ``cache_control`` (automatic caching) is a breakpoint on the last block."""
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad_request("'max_tokens' is required: a positive integer", "max_tokens")
    turns, chat_tools = _turns(body)
    prefix: list[Any] = []  # what every block up to the first breakpoint says, in the cache's order
    session: str | None = None
    ttl_s, marks = 0.0, 0
    for role, blocks in turns:
        for block in blocks:
            if role != "tools" and block["type"] == "text":
                prefix.append((role, block["text"]))
            else:
                prefix.append((role, {k: v for k, v in block.items() if k != "cache_control"}))
            ttl = _ttl_s(block, role)
            if ttl is not None:
                session = session or "cache_control:" + hashlib.sha256(orjson.dumps(prefix)).hexdigest()
                ttl_s, marks = max(ttl_s, ttl), marks + 1
    ttl = _ttl_s(body, "cache_control")  # automatic caching: a breakpoint on the last block
    if ttl is not None:
        session = session or "cache_control:" + hashlib.sha256(orjson.dumps(prefix)).hexdigest()
        ttl_s, marks = max(ttl_s, ttl), marks + 1
    if marks > MAX_BREAKPOINTS:  # each one costs a tokenization (``breakpoints``)
        raise bad_request(
            f"a maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided, found {marks}",
            "cache_control",
        )
    chat: dict[str, Any] = {"messages": _chat_of(turns), "max_tokens": max_tokens}
    if chat_tools:
        chat["tools"] = chat_tools
    if body.get("tool_choice") is not None:
        chat["tool_choice"], parallel = _chat_tool_choice(body["tool_choice"])
        if parallel is not None:
            chat["parallel_tool_calls"] = parallel
    for name in ("model", "stream", "temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("stop_sequences") is not None:
        chat["stop"] = body["stop_sequences"]
    return chat, session, ttl_s


async def create_message(request: web.Request) -> web.StreamResponse:
    try:
        return await _create_message(request)
    except ApiError as exc:
        return web.json_response(anthropic_error(exc.status, exc.message), status=exc.status)
    except web.HTTPException as exc:  # aiohttp's own, e.g. 413 for a body past client_max_size
        if exc.status < 400:
            raise
        return web.json_response(anthropic_error(exc.status, exc.reason), status=exc.status)


async def _create_message(request: web.Request) -> web.StreamResponse:
    state, tenant, body = await read_request(request)
    chat, session, ttl_s = translate(body)
    metadata = body.get("metadata")
    user = metadata.get("user_id") if isinstance(metadata, dict) else None
    req = await prepare(request, state, tenant, "chat", chat, session_id=session or user)
    translator = MessagesTranslator(chat["model"], len(req.prompt_ids), breakpoints=session is not None)
    kv_pins = await _retention(state, body, chat, req.prompt_ids) if session else []

    async def pin(worker: Worker) -> None:
        # After Router.routed's own pin (routing.session_ttl_s): this one lasts as long as the breakpoint.
        await state.shared.pin_session(Router._session_key(req), worker.worker_id, ttl_s)

    return await state.dispatcher.dispatch(request, req, translator, pin if session else None, kv_pins)


async def _retention(
    state: GatewayState, body: dict[str, Any], chat: dict[str, Any], prompt_ids: list[int]
) -> list[dict[str, Any]]:
    """The ``kv_pin`` for the request's breakpoints: each one's prefix of the prompt, in tokens. Skipped
    when no worker runs our engine (or retention is off): it costs a tokenization per breakpoint."""
    max_s = state.router.routing.max_retention_s
    if max_s <= 0 or not any(w.kind == "prefixgate" for w in state.pool):
        return []

    def prefix_tokens(messages: list[dict[str, Any]] | None) -> int:
        if messages is None:  # the top-level breakpoint: the whole prompt
            return len(prompt_ids)
        try:
            cut = chat_prompt_ids(state.tokenizer, messages, chat.get("tools"))
        except ApiError:  # a cut the template cannot render (a breakpoint on a tool alone): no pin
            return 0
        return common_prefix(cut, prompt_ids)

    loop = asyncio.get_running_loop()
    points = [
        (await loop.run_in_executor(state.tokenize_pool, prefix_tokens, messages), ttl_s)
        for messages, ttl_s in breakpoints(body)
    ]
    return breakpoint_pins(points, max_s)
