"""The byte mover under the KV transfer: a small interface so that another transport (NIXL on GPU
machines, whose wheels need CUDA) can replace Mooncake without touching the protocol.

A transport registers memory that peers may read, and reads a peer's registered memory into its own.
It knows nothing of pages, blocks or leases: the exporter and fetcher decide what to move.
"""

from __future__ import annotations

from typing import Protocol

from engine.transfer.config import TransferConfig


class TransportError(RuntimeError):
    """A transfer that did not complete (peer gone, connection refused, memory not registered)."""


class KVTransport(Protocol):
    """Invariants: ``read`` returns only once all ``length`` bytes are in local memory, or raises
    ``TransportError``; memory must stay registered (and alive) while any peer may read it. ``read``
    blocks its thread: callers run it off the event loop and off the engine thread."""

    name: str
    segment: str  # how peers name this engine's registered memory

    def register(self, address: int, length: int) -> None: ...
    def unregister(self, address: int) -> None: ...
    def read(self, segment: str, local_address: int, remote_address: int, length: int) -> None: ...
    def close(self) -> None: ...


def create_transport(config: TransferConfig) -> KVTransport:
    """The configured transport, imported lazily (a machine without it imports this module cleanly)."""
    if config.backend == "mooncake":
        from engine.transfer.mooncake import MooncakeTransport

        return MooncakeTransport(config.host)
    raise ValueError(f"unknown kv transfer backend {config.backend!r}")
