"""A scripted OpenAI-compatible SSE server: the test double for a server under measurement.

It streams a role-only chunk at once, then ``content_chunks`` content chunks (the first after
``first_delay_s``, the rest ``interval_s`` apart), a finish chunk, a usage chunk and [DONE], so a
client's measured TTFT/ITL can be checked against known delays. It also serves the admin routes the
load generator calls (``/admin/policy``, ``/flush_cache``, ``/v1/models``) and records every call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Script:
    first_delay_s: float = 0.1
    interval_s: float = 0.05
    content_chunks: int = 4
    prompt_tokens: int = 123
    cached_tokens: int = 64
    status: int = 200
    stream_error_after: int | None = None  # send an error event after this many content chunks


@dataclass
class Calls:
    requests: list[tuple[str, dict[str, Any], dict[str, str]]] = field(default_factory=list)
    policies: list[tuple[str, str | None]] = field(default_factory=list)
    flushes: int = 0


SCRIPT = web.AppKey("script", Script)
CALLS = web.AppKey("calls", Calls)


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def _completions(request: web.Request) -> web.StreamResponse:
    script, calls = request.app[SCRIPT], request.app[CALLS]
    body = orjson.loads(await request.read())
    calls.requests.append((request.path, body, dict(request.headers)))
    if script.status != 200:
        return web.json_response({"error": {"message": "scripted failure"}}, status=script.status)
    chat = request.path.endswith("chat/completions")

    def chunk(text: str | None, finish: str | None = None) -> dict[str, Any]:
        if chat:
            delta = {"role": "assistant", "content": ""} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta if finish is None else {}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish}
        return {
            "id": "x",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "choices": [choice],
        }

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(_event(chunk(None)))  # role-only / empty first chunk: not a token
    await response.write(b": ping\n\n")
    for index in range(script.content_chunks):
        await asyncio.sleep(script.first_delay_s if index == 0 else script.interval_s)
        if script.stream_error_after is not None and index == script.stream_error_after:
            await response.write(_event({"error": {"message": "scripted stream error", "code": 500}}))
            return response
        await response.write(_event(chunk(f"tok{index} ")))
    await response.write(_event(chunk("", finish="length")))
    usage = {
        "prompt_tokens": script.prompt_tokens,
        "completion_tokens": script.content_chunks,
        "total_tokens": script.prompt_tokens + script.content_chunks,
        "prompt_tokens_details": {"cached_tokens": script.cached_tokens},
    }
    await response.write(_event({"id": "x", "choices": [], "usage": usage}))
    await response.write(b"data: [DONE]\n\n")
    return response


async def _policy(request: web.Request) -> web.Response:
    body = await request.json()
    request.app[CALLS].policies.append((body["policy"], request.headers.get("Authorization")))
    return web.json_response({"policy": body["policy"]})


async def _flush(request: web.Request) -> web.Response:
    request.app[CALLS].flushes += 1
    return web.json_response({"ok": True})


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "stub-model", "object": "model"}]})


def create_stub_app(script: Script) -> web.Application:
    app = web.Application()
    app[SCRIPT] = script
    app[CALLS] = Calls()
    app.router.add_post("/v1/chat/completions", _completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/admin/policy", _policy)
    app.router.add_post("/flush_cache", _flush)
    app.router.add_get("/v1/models", _models)
    return app


@contextmanager
def stub_server_in_thread(script: Script) -> Iterator[tuple[str, Calls]]:
    """Serve the stub on loopback from its own thread and loop (for code that calls ``asyncio.run``)."""
    app = create_stub_app(script)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", app[CALLS]
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
