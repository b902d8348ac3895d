"""Where a worker publishes its KV events: discovered from its server info, or given on the command line.

* Our engine reports ``kv_events_endpoint``, an address it binds; the gateway connects.
* SGLang reports ``kv_events_config``, the JSON string it was started with (``--kv-events-config``):
  ``{"publisher": "zmq", "endpoint": ..., "replay_endpoint": ..., "topic": ...}``. SGLang (and vLLM, whose
  publisher is the same) *binds* its PUB socket when the endpoint has a wildcard (``*``, ``::``) or is
  ``ipc://``/``inproc://``, and otherwise *connects* to it: then the gateway binds that address instead.
  The replay ROUTER is always bound by the engine.
* ``--worker-events URL=tcp://host:port`` names the address to connect to (the engine bound it);
  ``URL=bind:tcp://host:port`` one the gateway binds (the engine connects to it, as SGLang and vLLM do
  with a non-wildcard endpoint, e.g. the loopback one ``prefixgate serve --engine sglang`` gives them).

A wildcard host the gateway must connect to (``*``, ``0.0.0.0``, ``::``) means the worker's own host.
Data-parallel ranks publish on the endpoint's port plus the rank (SGLang's and vLLM's convention).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

_WILDCARD_HOSTS = ("*", "0.0.0.0", "::", "[::]", "")
BIND_PREFIX = "bind:"


@dataclass(frozen=True)
class EventSource:
    endpoint: str  # rank 0's PUB address, as the gateway uses it (connects to it, or binds it)
    bind: bool = False  # the engine connects: the gateway binds ``endpoint``
    replay_endpoint: str | None = None  # rank 0's replay ROUTER (always bound by the engine)
    topic: str = ""
    curve_server_key: str | None = None  # the publisher's CURVE public key (Z85) when it encrypts

    def for_rank(self, rank: int) -> EventSource:
        """The source of DP rank ``rank``: ports offset by the rank, as the engines publish them."""
        return replace(
            self,
            endpoint=rank_endpoint(self.endpoint, rank),
            replay_endpoint=rank_endpoint(self.replay_endpoint, rank) if self.replay_endpoint else None,
        )


def rank_endpoint(endpoint: str, rank: int) -> str:
    """SGLang's ``offset_endpoint_port``: tcp ports plus the rank, inproc names suffixed ``_dp<rank>``."""
    if rank == 0:
        return endpoint
    if endpoint.startswith("inproc://"):
        return f"{endpoint}_dp{rank}"
    if endpoint.startswith("tcp://"):
        base, _, port = endpoint.rpartition(":")
        return f"{base}:{int(port) + rank}"
    raise ValueError(f"cannot offset {endpoint!r} by a DP rank: not tcp:// or inproc://")


def on_worker_host(endpoint: str, worker_url: str) -> str:
    """``endpoint`` with a wildcard host replaced by the worker's host (it binds all its interfaces)."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    if host not in _WILDCARD_HOSTS:
        return endpoint
    worker_host = urlsplit(worker_url).hostname or "127.0.0.1"
    if ":" in worker_host:
        worker_host = f"[{worker_host}]"
    return f"tcp://{worker_host}:{port}"


def engine_binds(endpoint: str) -> bool:
    """Whether SGLang's/vLLM's publisher binds ``endpoint`` (their heuristic) rather than connecting."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def from_sglang_config(config: object, worker_url: str) -> EventSource | None:
    """The source an SGLang server's ``kv_events_config`` (a JSON string) describes; None without a ZMQ
    publisher or on anything malformed (workers are not trusted)."""
    if not isinstance(config, str) or not config:
        return None
    try:
        parsed = json.loads(config)
    except ValueError:
        return None
    if not isinstance(parsed, dict) or parsed.get("publisher") != "zmq":
        return None
    endpoint = parsed.get("endpoint", "tcp://*:5557")  # SGLang's KVEventsConfig default
    replay = parsed.get("replay_endpoint")
    topic = parsed.get("topic", "")
    if not isinstance(endpoint, str) or not isinstance(topic, str):
        return None
    return EventSource(
        endpoint=on_worker_host(endpoint, worker_url) if engine_binds(endpoint) else endpoint,
        bind=not engine_binds(endpoint),
        replay_endpoint=on_worker_host(replay, worker_url) if isinstance(replay, str) and replay else None,
        topic=topic,
    )


def parse_worker_events(specs: tuple[str, ...]) -> dict[str, EventSource]:
    """``--worker-events URL=ENDPOINT`` flags -> worker URL (no trailing slash) -> its source."""
    sources = {}
    for spec in specs:
        url, sep, endpoint = spec.partition("=")
        bind = endpoint.startswith(BIND_PREFIX)
        endpoint = endpoint.removeprefix(BIND_PREFIX)
        if not sep or not url or not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(
                f"--worker-events {spec!r}: expected URL=tcp://host:port (or URL=bind:tcp://...)"
            )
        sources[url.rstrip("/")] = EventSource(endpoint if bind else on_worker_host(endpoint, url), bind)
    return sources
