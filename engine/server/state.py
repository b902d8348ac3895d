"""What the handlers share: the engine's async driver, settings, metrics and running requests.

The server sees the engine only through ``AsyncEngine``: its ``info`` (immutable facts: model,
vocabulary, context, page size, limits), its ``stats`` snapshot and its request stream API.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from cache.prompt.tokenizer import Tokenizer
from engine.async_engine import AsyncEngine
from engine.engine import EngineInfo
from engine.server.kv_events import KVEventPublisher
from engine.server.metrics import ServerMetrics
from engine.server.tracker import RequestTracker
from engine.transfer.config import TransferConfig
from engine.transfer.service import TransferService


def _flag(default: Any, help: str, **more: Any) -> Any:
    return field(default=default, metadata={"help": help, **more})


ROLES = ("mixed", "prefill", "decode")


@dataclass(frozen=True)
class ServerSettings:
    """Fields with ``help`` are ``prefixgate engine`` flags (``cache.api.flags``)."""

    host: str = _flag("127.0.0.1", "address to bind")
    port: int = _flag(30000, "port to listen on")
    kv_events_endpoint: str | None = _flag(
        None,
        "publish KV cache events on this ZMQ PUB address, e.g. tcp://127.0.0.1:5557 (other hosts' addresses "
        "need --kv-events-curve-secret-key or --kv-events-allow-remote); default: no events",
        metavar="ZMQ_ADDR",
    )
    kv_events_token_ids: bool = _flag(
        False, "include prompt token ids in BlockStored events (they reveal every tenant's prompt text)"
    )
    kv_events_allow_remote: bool = _flag(False, "allow a non-loopback KV event endpoint without encryption")
    kv_events_curve_secret_key_file: str | None = _flag(
        None,
        "encrypt KV events with ZMQ CURVE: this server's secret key (zmq.curve_keypair()'s 40-character "
        "Z85 secret, or a .key_secret certificate); subscribers need its public key",
        flag="--kv-events-curve-secret-key",
        metavar="FILE",
    )
    kv_events_curve_clients_dir: str | None = _flag(
        None,
        "with CURVE: only clients whose public-key certificates are in DIR may subscribe",
        flag="--kv-events-curve-clients",
        metavar="DIR",
    )
    role: str = _flag(
        "mixed",
        "prefill/decode disaggregation: a prefill worker prefills prompts for decode workers, which pull "
        "the KV and decode; both need --kv-transfer (implied); mixed does both",
        choices=ROLES,
    )
    shutdown_grace_s: float = _flag(
        30.0, "how long in-flight requests may run after SIGTERM", flag="--shutdown-grace", metavar="SECONDS"
    )
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
    bound_port: int | None = None  # the port the server listens on (``--port 0`` picks one)

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    @property
    def advertised_address(self) -> tuple[str, int]:
        """Where peers reach this server's HTTP routes (the KV transfer control channel): its bind
        address, or the transfer engine's when it binds every interface."""
        host = self.settings.host
        if host in ("", "0.0.0.0", "::") and self.transfer is not None:
            host = self.transfer.config.host
        return host, self.bound_port or self.settings.port

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer


STATE = web.AppKey("prefixgate_engine_state", ServerState)
