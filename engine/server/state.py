"""What the handlers share: the engine's async driver, settings, metrics and running requests.

The server sees the engine only through ``AsyncEngine``: its ``info`` (immutable facts: model,
vocabulary, context, page size, limits), its ``stats`` snapshot and its request stream API.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from cache.prompt.tokenizer import Tokenizer
from engine.async_engine import AsyncEngine
from engine.engine import EngineInfo
from engine.server.kv_events import KVEventPublisher
from engine.server.metrics import ServerMetrics
from engine.server.tracker import RequestTracker
from engine.transfer.config import TransferConfig
from engine.transfer.service import TransferService


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 30000
    kv_events_endpoint: str | None = None  # e.g. "tcp://127.0.0.1:5557"; None = no KV events
    kv_events_token_ids: bool = False  # put prompt token ids in BlockStored (they reveal prompt text)
    kv_events_allow_remote: bool = False  # bind a non-loopback endpoint without CURVE
    kv_events_curve_secret_key_file: str | None = None  # encrypt with CURVE (this server's secret key)
    kv_events_curve_clients_dir: str | None = None  # with CURVE: only these client keys may subscribe
    shutdown_grace_s: float = 30.0  # in-flight requests get this long to finish on shutdown
    health_generate_timeout_s: float = 20.0
    kv_transfer: TransferConfig | None = None  # None = no KV transfer service (no fetch plans, no exports)


@dataclass
class ServerState:
    engine: AsyncEngine
    settings: ServerSettings
    metrics: ServerMetrics
    publisher: KVEventPublisher | None = None
    transfer: TransferService | None = None
    tracker: RequestTracker = field(default_factory=RequestTracker)
    started: float = field(default_factory=time.time)
    ready: bool = False  # the step loop runs
    draining: bool = False  # shutting down: new requests get 503

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer


STATE = web.AppKey("prefixgate_engine_state", ServerState)
