"""Anthropic's Messages API at the gateway: ``POST /v1/messages``.

The request becomes a chat-completions body (``system`` as the system message, text blocks joined), parsed,
hashed and routed like any chat request; the answer comes back through ``MessagesTranslator``. Every
error on this route leaves in Anthropic's shape (``{"type": "error", "error": {"type", "message"}}``).

``cache_control`` breakpoints (``{"type": "ephemeral", "ttl": "5m" | "1h"}``) are honoured as session
pins: the prefix up to the first breakpoint (the stable part: system prompt, shared context) names the
session, and once a worker has served it the session stays pinned there for the longest breakpoint ttl,
so later requests sharing that prefix go where it is cached. The engine's prefix cache itself is LRU: the
pin steers requests, it does not hold pages in the engine.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from aiohttp import web

from cache.api.errors import ApiError, bad_request
from gateway.handlers import prepare, read_request
from gateway.messages_translator import MessagesTranslator, anthropic_error
from gateway.router import Router
from gateway.workers import Worker

CACHE_TTLS_S = {"5m": 300.0, "1h": 3600.0}
_ROLES = ("user", "assistant")


def _blocks(value: Any, where: str) -> list[dict[str, Any]]:
    """A content value (a string, or text blocks) as text blocks."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if not isinstance(value, list):
        raise bad_request(f"{where} must be a string or an array of text blocks", where)
    for i, block in enumerate(value):
        if not isinstance(block, dict) or block.get("type") != "text":
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise bad_request(f"{where}[{i}]: only text blocks are supported, not {kind!r}", where)
        if not isinstance(block.get("text"), str):
            raise bad_request(f"{where}[{i}].text must be a string", where)
    return value


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


def translate(body: dict[str, Any]) -> tuple[dict[str, Any], str | None, float]:
    """The chat body for a Messages request; the session its first ``cache_control`` breakpoint names
    (None without one) and the longest breakpoint ttl in seconds (0 without one). A top-level
    ``cache_control`` (automatic caching) is a breakpoint on the last block."""
    if body.get("tools"):
        raise bad_request("tools are not supported on /v1/messages at this gateway", "tools")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad_request("'max_tokens' is required: a positive integer", "max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", "messages")
    turns: list[tuple[str, list[dict[str, Any]]]] = []
    if body.get("system") is not None:
        turns.append(("system", _blocks(body["system"], "system")))
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise bad_request(f"messages[{i}].role must be 'user' or 'assistant'", "messages")
        turns.append((message["role"], _blocks(message.get("content"), f"messages[{i}].content")))
    prefix: list[Any] = []  # (role, text) of every block up to the first breakpoint
    session: str | None = None
    ttl_s = 0.0
    for role, blocks in turns:
        for block in blocks:
            prefix.append((role, block["text"]))
            ttl = _ttl_s(block, role)
            if ttl is not None:
                session = session or "cache_control:" + hashlib.sha256(orjson.dumps(prefix)).hexdigest()
                ttl_s = max(ttl_s, ttl)
    ttl = _ttl_s(body, "cache_control")  # automatic caching: a breakpoint on the last block
    if ttl is not None:
        session = session or "cache_control:" + hashlib.sha256(orjson.dumps(prefix)).hexdigest()
        ttl_s = max(ttl_s, ttl)
    chat: dict[str, Any] = {
        "messages": [{"role": role, "content": "".join(b["text"] for b in blocks)} for role, blocks in turns],
        "max_tokens": max_tokens,
    }
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

    async def pin(worker: Worker) -> None:
        # After Router.routed's own pin (routing.session_ttl_s): this one lasts as long as the breakpoint.
        await state.shared.pin_session(Router._session_key(req), worker.worker_id, ttl_s)

    return await state.dispatcher.dispatch(request, req, translator, pin if session else None)
