"""Settings of an engine's KV transfer service, built once at the edge (CLI or caller)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BACKENDS = ("mooncake",)


TRANSFER = "transfer"  # the argument group of the KV-transfer flags


def _flag(default: Any, help: str, flag: str, **more: Any) -> Any:
    dest = flag.removeprefix("--").replace("-", "_")  # apart from the server's own --host and --timeout
    return field(
        default=default, metadata={"help": help, "flag": flag, "dest": dest, "group": TRANSFER, **more}
    )


@dataclass(frozen=True)
class TransferConfig:
    """Fields with ``help`` are ``prefixgate engine`` flags (``cache.api.flags``), with ``--kv-transfer``."""

    backend: str = "mooncake"  # the transport that moves the bytes (``engine.transfer.transport``)
    host: str = _flag(
        "127.0.0.1",
        "address the transfer engine listens on (its handshake and data ports)",
        "--kv-transfer-host",
    )
    export_buffer_mib: int = _flag(
        256,
        "staging memory for exports and for imports, each (full: exports refused, fetches fall back)",
        "--kv-transfer-buffer-mib",
    )
    import_buffer_mib: int = 256  # staging memory this engine reads into (the CLI sets it as export's)
    timeout_s: float = _flag(
        10.0,
        "one fetch, end to end, before the request recomputes",
        "--kv-transfer-timeout",
        metavar="SECONDS",
    )
    lease_ttl_s: float = _flag(
        30.0,
        "staged pages a reader never released are freed after this",
        "--kv-transfer-lease-ttl",
        metavar="SECONDS",
    )

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"kv transfer backend must be one of {', '.join(BACKENDS)}")
        if self.export_buffer_mib < 1 or self.import_buffer_mib < 1:
            raise ValueError("kv transfer buffers must be at least 1 MiB")
        if self.timeout_s <= 0 or self.lease_ttl_s <= 0:
            raise ValueError("kv transfer timeouts must be positive")
