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
  Options follow after commas: ``,replay=tcp://host:port`` the engine's replay ROUTER (its
  ``replay_endpoint``), asked for the batches a gap lost; ``,dp=N`` the number of data-parallel ranks,
  each its own stream (vLLM does not report its DP size; for SGLang it overrides ``dp_size``).

A wildcard host the gateway must connect to (``*``, ``0.0.0.0``, ``::``) means the worker's own host.
Data-parallel ranks publish on the endpoint's port plus the rank, and so do their replay sockets (SGLang's
and vLLM's convention).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from cache.index.zmq_consumer import WorkerFeed

_WILDCARD_HOSTS = ("*", "0.0.0.0", "::", "[::]", "")
BIND_PREFIX = "bind:"
MAX_DP_RANKS = 256  # streams one worker may ask the gateway to subscribe to
_SCHEMES = ("tcp://", "ipc://", "inproc://")
SPEC_FORM = "URL=[bind:]tcp://host:port[,replay=tcp://host:port][,dp=N]"


@dataclass(frozen=True)
class EventSource:
    endpoint: str  # rank 0's PUB address, as the gateway uses it (connects to it, or binds it)
    bind: bool = False  # the engine connects: the gateway binds ``endpoint``
    replay_endpoint: str | None = None  # rank 0's replay ROUTER (always bound by the engine)
    topic: str = ""
    curve_server_key: str | None = None  # the publisher's CURVE public key (Z85) when it encrypts
    dp_ranks: int | None = None  # streams, one per DP rank, as configured; None: as the worker reports

    def for_rank(self, rank: int) -> EventSource:
        """The source of DP rank ``rank``: ports offset by the rank, as the engines publish them."""
        return replace(
            self,
            endpoint=rank_endpoint(self.endpoint, rank),
            replay_endpoint=rank_endpoint(self.replay_endpoint, rank) if self.replay_endpoint else None,
        )

    def feed(
        self, worker_id: str, rank: int, curve_client_keys: tuple[bytes, bytes] | None = None
    ) -> WorkerFeed:
        """The subscription to DP rank ``rank``'s stream (``curve_client_keys``: the gateway's own
        certificate, for a publisher that lists its clients)."""
        ranked = self.for_rank(rank)
        return WorkerFeed(
            worker_id,
            ranked.endpoint,
            topic=ranked.topic,
            curve_server_key=ranked.curve_server_key,
            curve_client_keys=curve_client_keys,
            rank=rank,
            bind=ranked.bind,
            replay_endpoint=ranked.replay_endpoint,
        )


def rank_endpoint(endpoint: str, rank: int) -> str:
    """SGLang's ``offset_endpoint_port``: tcp ports plus the rank, inproc names suffixed ``_dp<rank>``."""
    if rank == 0:
        return endpoint
    if endpoint.startswith("inproc://"):
        return f"{endpoint}_dp{rank}"
    if endpoint.startswith("tcp://"):
        base, _, port = endpoint.rpartition(":")
        if not port.isascii() or not port.isdigit() or int(port) + rank > 65535:
            raise ValueError(f"cannot offset {endpoint!r} by DP rank {rank}: not a port, or past 65535")
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
    """``--worker-events`` flags (``SPEC_FORM``) -> worker URL (no trailing slash) -> its source."""
    return dict(_parse_spec(spec) for spec in specs)


def _parse_spec(spec: str) -> tuple[str, EventSource]:
    def bad(why: str) -> ValueError:
        return ValueError(f"--worker-events {spec!r}: {why}; expected {SPEC_FORM}")

    url, sep, rest = spec.partition("=")
    endpoint, *options = rest.split(",")
    bind = endpoint.startswith(BIND_PREFIX)
    endpoint = endpoint.removeprefix(BIND_PREFIX)
    if not sep or not url or not endpoint.startswith(_SCHEMES):
        raise bad("no worker URL or no ZMQ endpoint")
    url = url.rstrip("/")
    values: dict[str, str] = {}
    for option in options:
        key, eq, value = option.partition("=")
        if key not in ("replay", "dp") or not eq or not value or key in values:
            raise bad(f"unknown, empty or repeated option {option!r}")
        values[key] = value
    replay = values.get("replay")
    if replay is not None and not replay.startswith(_SCHEMES):
        raise bad("the replay endpoint is not a ZMQ endpoint")
    dp = values.get("dp", "1")
    if not (dp.isascii() and dp.isdigit() and len(dp) <= 3 and 1 <= int(dp) <= MAX_DP_RANKS):
        raise bad(f"dp must be a whole number of ranks from 1 to {MAX_DP_RANKS}")
    source = EventSource(
        endpoint if bind else on_worker_host(endpoint, url),
        bind,
        replay_endpoint=on_worker_host(replay, url) if replay else None,  # the engine binds it
        dp_ranks=int(dp) if "dp" in values else None,
    )
    try:  # every rank's ports must exist (tcp ports offset, inproc names suffixed; ipc cannot be)
        source.for_rank(int(dp) - 1)
    except ValueError as exc:
        raise bad(str(exc)) from None
    return url, source
