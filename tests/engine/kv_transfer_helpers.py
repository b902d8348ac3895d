"""Helpers shared by the KV transfer tests: engine servers on loopback, fetch plans, a gated transport.

``GatedTransport`` wraps the real Mooncake transport: it moves the real bytes, and a test can hold a
read (to cancel or time out mid-transfer) or corrupt what arrived (a checksum failure).
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.server.app import create_app, load_engine, start_site
from engine.server.state import STATE, ServerSettings, ServerState
from engine.transfer.config import TransferConfig
from engine.transfer.mooncake import MooncakeTransport
from engine.transfer.service import TransferService

KV_CACHE_TOKENS = 4096


class GatedTransport:
    """The real transport, plus two faults a test turns on: ``hold`` (a read waits until ``open``)
    and ``corrupt`` (the first byte read is flipped)."""

    def __init__(self, inner: MooncakeTransport) -> None:
        self.inner, self.name, self.segment = inner, inner.name, inner.segment
        self.gate = threading.Event()
        self.gate.set()
        self.reading = threading.Event()  # set once a held read has started
        self.corrupt = False

    def register(self, address: int, length: int) -> None:
        self.inner.register(address, length)

    def unregister(self, address: int) -> None:
        self.inner.unregister(address)

    def read(self, segment: str, local_address: int, remote_address: int, length: int) -> None:
        self.reading.set()
        self.gate.wait()
        self.inner.read(segment, local_address, remote_address, length)
        if self.corrupt:
            byte = ctypes.c_uint8.from_address(local_address)
            byte.value ^= 0xFF

    def close(self) -> None:
        self.inner.close()


@dataclass
class Server:
    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def state(self) -> ServerState:
        return self.app[STATE]

    @property
    def engine(self) -> LLMEngine:
        return self.state.engine.engine


class Loop:
    """One event loop on a background thread that serves every in-process engine of a test module."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="engine-servers", daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def start_server(
    loop: Loop,
    model_path: str,
    loaded: Any,
    transfer: TransferConfig,
    gated: bool = False,
    role: str = "mixed",
) -> Server:
    settings = ServerSettings(port=0, shutdown_grace_s=5.0, kv_transfer=transfer, role=role)
    config = EngineConfig(model=model_path, dtype="float32", kv_cache_tokens=KV_CACHE_TOKENS)

    async def start() -> Server:
        engine, publisher = load_engine(config, settings, loaded)
        service = None
        if gated:
            service = TransferService(engine, transfer, GatedTransport(MooncakeTransport(transfer.host)))
        app = create_app(engine, settings, publisher, service)
        runner, port = await start_site(app, "127.0.0.1", 0)
        return Server(f"http://127.0.0.1:{port}", app, runner)

    return loop.run(start())


def plan_for(source: Server, prompt: list[int], salt: str = "", **overrides: Any) -> dict[str, Any]:
    """The plan a gateway would attach: the prompt's whole-page block hashes in ``salt``'s namespace."""
    engine = source.engine
    ps = engine.info.page_size
    seed = engine.cache.namespace_hash(salt) if salt and engine.cache.namespace_hash else None
    assert engine.cache.hasher is not None
    hashes = engine.cache.hasher(seed, prompt[: len(prompt) // ps * ps])
    plan = {
        "plan_id": f"plan-{time.monotonic_ns()}",
        "source_endpoint": source.url,
        "block_hashes": hashes,
        "planned_prefix_blocks": len(hashes),
        "expires_at_ms": int(time.time() * 1000) + 60_000,
        "namespace": salt,
    }
    return {**plan, **overrides}


def generate(url: str, prompt: list[int], plan: dict | None = None, salt: str = "") -> dict[str, Any]:
    """SGLang ``/generate`` with greedy sampling: output token ids and cached tokens."""
    body: dict[str, Any] = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    if plan is not None:
        body["kv_fetch_plan"] = plan
    if salt:
        body["cache_salt"] = salt
    return http("POST", f"{url}/generate", body)


def http(method: str, url: str, body: dict | None = None) -> Any:
    async def go() -> Any:
        async with aiohttp.ClientSession() as session, session.request(method, url, json=body) as r:
            if r.content_type == "application/json":
                return await r.json()
            return await r.text()

    return asyncio.run(go())


def metric(url: str, name: str) -> float:
    """One sample of the engine's /metrics (0 when absent), e.g. ``kv_fetches_total{outcome="ok"}``."""
    for line in http("GET", f"{url}/metrics").splitlines():
        if line.startswith(f"prefixgate_engine_{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_until(condition: Any, what: str, timeout: float = 60) -> None:
    """Poll ``condition`` (a correctness condition, not a timing one) until it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"never became true: {what}")


def nothing_held(*servers: Server) -> bool:
    """No export lease and no import region on any of the servers."""
    for server in servers:
        info = http("GET", f"{server.url}/kv_transfer/info")
        if info["export_leases"] or info["export_bytes_leased"] or info["import_bytes_in_use"]:
            return False
    return True


@contextmanager
def held(transport: GatedTransport) -> Iterator[None]:
    transport.gate.clear()
    transport.reading.clear()
    try:
        yield
    finally:
        transport.gate.set()


@contextmanager
def server_pair(
    model_path: str, loaded: Any, roles: tuple[str, str] = ("mixed", "mixed")
) -> Iterator[tuple[Server, Server]]:
    """Two engine servers on one background loop sharing ``loaded``: A plain, B with a
    ``GatedTransport``; each with a role (``--role``)."""
    loop = Loop()
    config = TransferConfig(export_buffer_mib=32, import_buffer_mib=32, timeout_s=60.0, lease_ttl_s=60.0)
    a = start_server(loop, model_path, loaded, config, role=roles[0])
    b = start_server(loop, model_path, loaded, config, gated=True, role=roles[1])
    try:
        yield a, b
    finally:
        for server in (a, b):
            loop.run(server.runner.cleanup())
        loop.close()


def pages_leaked(server: Server) -> bool:
    """Pages owned by neither the prefix cache nor the free list, with no request running."""
    stats = server.state.engine.stats
    return stats.num_running == 0 and stats.pages_used != stats.pages_cached


_prompts = itertools.count(1)


def new_prompt(length: int = 200) -> list[int]:
    """A prompt no earlier test of the session cached (distinct token ids from the first page on)."""
    n = next(_prompts)
    return [1000 + n, *[(n * 7919 + i * 31) % 40000 + 500 for i in range(length - 1)]]
