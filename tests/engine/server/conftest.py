"""One real engine worker for the whole session: the bundled model, served on a loopback port.

The app runs on its own event loop in a background thread, exactly as ``prefixgate engine`` runs
it, so tests can drive it with any client (the official ``openai`` package, aiohttp, httpx, ZMQ).
Loading the model once keeps the suite cheap. The KV pool is small (1024 tokens = 64 pages) so that
eviction is easy to reach; that is also the context length.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.kv.prefix_cache import Node
from engine.loader import LoadedModel
from engine.server.app import create_app, load_engine, start_site
from engine.server.kv_events import KVEventPublisher
from engine.server.state import STATE, ServerSettings, ServerState

KV_CACHE_TOKENS = 1024


@dataclass
class EngineServer:
    url: str
    app: web.Application
    publisher: KVEventPublisher
    loop: asyncio.AbstractEventLoop

    @property
    def state(self) -> ServerState:
        return self.app[STATE]

    @property
    def engine(self) -> LLMEngine:
        """The engine behind the server, for tests to inspect while it is idle (``wait_idle``)."""
        return self.state.engine.engine

    @property
    def model_id(self) -> str:
        return self.engine.info.model_id

    def is_idle(self) -> bool:
        return (
            not self.state.tracker
            and not self.state.engine.num_requests
            and not self.engine.scheduler.has_work()
        )

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Requests finished and the step loop has applied every abort. Only then may a test read
        the engine's structures from this thread."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.is_idle():
                time.sleep(0.05)  # an abort submitted just now is applied within one loop turn
                if self.is_idle():
                    return
            time.sleep(0.02)
        raise AssertionError("the engine did not become idle")

    def cached_block_hashes(self) -> set[int]:
        """The truth: every block hash in the engine's prefix tree (read while idle)."""
        hashes, stack = set(), list(self.engine.cache.roots.values())  # every salt namespace
        while stack:
            node: Node = stack.pop()
            hashes.update(node.hashes)
            stack.extend(node.children.values())
        return hashes

    def cached_prefix_tokens(self, token_ids: list[int]) -> int:
        """How many leading tokens of ``token_ids`` the tree holds, in whole pages (read-only walk)."""
        ps, node, i = self.engine.info.page_size, self.engine.cache.root, 0
        while True:
            child = node.children.get(tuple(token_ids[i : i + ps]))
            if child is None:
                return i
            n = 0
            while (
                n < len(child.pages)
                and child.key[n * ps : (n + 1) * ps] == token_ids[i + n * ps : i + (n + 1) * ps]
            ):
                n += 1
            i += n * ps
            if n < len(child.pages):
                return i
            node = child


@pytest.fixture(scope="session")
def engine_server(smollm2_gguf_path: Path, smollm2_model) -> Iterator[EngineServer]:
    config = EngineConfig(model=str(smollm2_gguf_path), dtype="float32", kv_cache_tokens=KV_CACHE_TOKENS)
    with serve_engine(config, smollm2_model) as server:
        yield server


@contextlib.contextmanager
def serve_engine(config: EngineConfig, loaded: LoadedModel | None = None) -> Iterator[EngineServer]:
    """A real engine server for ``config`` (with KV events) on a loopback port, served from a thread."""
    settings = ServerSettings(port=0, kv_events_endpoint="tcp://127.0.0.1:*", shutdown_grace_s=5.0)
    engine, publisher = load_engine(config, settings, loaded)
    assert publisher is not None
    app = create_app(engine, settings, publisher)
    loop = asyncio.new_event_loop()
    started: list = []

    def serve() -> None:
        asyncio.set_event_loop(loop)
        started.append(loop.run_until_complete(start_site(app, "127.0.0.1", 0)))
        loop.run_forever()

    thread = threading.Thread(target=serve, name="engine-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not started and time.monotonic() < deadline:
        time.sleep(0.01)
    runner, port = started[0]
    try:
        yield EngineServer(f"http://127.0.0.1:{port}", app, publisher, loop)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
