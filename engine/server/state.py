"""What the handlers share: the engine, its async driver, settings, metrics and running requests."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from cache.prompt.tokenizer import Tokenizer
from engine.async_engine import AsyncEngine
from engine.engine import LLMEngine
from engine.server.generation import RequestTracker
from engine.server.kv_events import KVEventPublisher
from engine.server.metrics import ServerMetrics


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 30000
    kv_events_endpoint: str | None = None  # e.g. "tcp://127.0.0.1:5557"; None = no KV events
    shutdown_grace_s: float = 30.0  # in-flight requests get this long to finish on shutdown
    health_generate_timeout_s: float = 20.0


@dataclass
class ServerState:
    engine: LLMEngine
    async_engine: AsyncEngine
    settings: ServerSettings
    metrics: ServerMetrics
    publisher: KVEventPublisher | None = None
    tracker: RequestTracker = field(default_factory=RequestTracker)
    started: float = field(default_factory=time.time)
    ready: bool = False  # the step loop runs
    draining: bool = False  # shutting down: new requests get 503

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.engine.model.config.vocab_size


STATE = web.AppKey("prefixgate_engine_state", ServerState)
