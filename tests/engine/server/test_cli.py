"""``prefixgate engine`` as a process: graceful shutdown, and SGLang's router in front of two workers.

Each test starts real worker processes (a model load each), so they are marked slow.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from scripts.sglang_router_demo import REPO, free_port, http, main, wait_until

pytestmark = pytest.mark.slow


async def read_stream(resp: aiohttp.ClientResponse, first_event: asyncio.Event) -> list:
    seen: list = []
    async for line in resp.content:
        if line.startswith(b"data: "):
            data = line.strip()[len(b"data: ") :]
            seen.append(None if data == b"[DONE]" else json.loads(data))
            first_event.set()
    return seen


async def test_sigterm_finishes_short_requests_and_ends_long_ones_with_an_error(tmp_path: Path) -> None:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "gateway.cli",
        "engine",
        "--port",
        str(port),
        "--kv-cache-tokens",
        "1024",
        "--threads",
        "1",
        "--shutdown-grace",
        "3",
    ]
    with open(tmp_path / "engine.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http("GET", url + "/health", timeout=2)[0] == 200, "engine", 120, proc)

        async def run(session: aiohttp.ClientSession, max_tokens: int, started: asyncio.Event) -> list:
            body = {
                "prompt": "Tell me everything.",
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "stream": True,
            }
            async with session.post(url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                return await read_stream(resp, started)

        async with aiohttp.ClientSession() as session:
            started = [asyncio.Event(), asyncio.Event()]
            tasks = [asyncio.create_task(run(session, n, e)) for n, e in zip((6, 1000), started, strict=True)]
            for event in started:
                await event.wait()
            proc.send_signal(signal.SIGTERM)
            short, long = await asyncio.gather(*tasks)
        assert short[-1] is None and short[-2]["choices"][0]["finish_reason"] == "length"
        assert long[-1] is None and long[-2]["error"]["type"] == "server_error"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "shutting down" in (tmp_path / "engine.log").read_text()


def test_sglang_router_routes_to_two_engine_workers(tmp_path: Path) -> None:
    summary = main(tmp_path, verbose=False)
    assert summary["requests_per_worker"] == [2.0, 2.0]
    assert summary["router_listeners"] == [] or all(
        a.startswith("127.0.0.1:") for a in summary["router_listeners"]
    )
