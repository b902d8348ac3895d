"""Settings of an engine's KV transfer service, built once at the edge (CLI or caller)."""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("mooncake",)


@dataclass(frozen=True)
class TransferConfig:
    backend: str = "mooncake"  # the transport that moves the bytes (``engine.transfer.transport``)
    host: str = "127.0.0.1"  # the address the transport listens on (its handshake and data ports)
    export_buffer_mib: int = 256  # staging memory peers read from; full = new exports refused (503)
    import_buffer_mib: int = 256  # staging memory this engine reads into; full = fetches fall back
    timeout_s: float = 10.0  # one fetch, end to end; past it the request recomputes
    lease_ttl_s: float = 30.0  # an export not released by its reader within this is freed anyway

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"kv transfer backend must be one of {', '.join(BACKENDS)}")
        if self.export_buffer_mib < 1 or self.import_buffer_mib < 1:
            raise ValueError("kv transfer buffers must be at least 1 MiB")
        if self.timeout_s <= 0 or self.lease_ttl_s <= 0:
            raise ValueError("kv transfer timeouts must be positive")
