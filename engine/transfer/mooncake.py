"""``KVTransport`` over Mooncake's Transfer Engine (PyPI ``mooncake-transfer-engine-non-cuda`` on CPU
machines, ``mooncake-transfer-engine`` on CUDA ones; same API): P2P handshake metadata (no metadata
server), the TCP transport here, RDMA where the fleet has it.

Each engine owns one ``TransferEngine``, listening on ``host`` (loopback by default) on a port it
picks; its ``segment`` (``host:port``) is what peers pass to read its registered memory.
"""

from __future__ import annotations

import os

from engine.transfer.transport import TransportError

_CHUNK_BYTES = 16 * 2**20  # one read is submitted as a batch of slices of this size


class MooncakeTransport:
    name = "mooncake"

    def __init__(self, host: str = "127.0.0.1", protocol: str = "tcp") -> None:
        os.environ.setdefault("GLOG_minloglevel", "2")  # Mooncake logs every handshake at INFO
        try:
            from mooncake.engine import TransferEngine
        except ImportError as exc:
            raise RuntimeError(
                "KV transfer needs Mooncake's Transfer Engine: pip install mooncake-transfer-engine-non-cuda "
                "(CPU; it needs Debian's libibverbs1 and libnuma1) or mooncake-transfer-engine (CUDA)"
            ) from exc
        self._engine = TransferEngine()
        rc = self._engine.initialize(host, "P2PHANDSHAKE", protocol, "")
        if rc != 0:
            raise RuntimeError(f"Mooncake transfer engine failed to start on {host} ({protocol}): rc {rc}")
        self.segment = f"{host}:{self._engine.get_rpc_port()}"

    def register(self, address: int, length: int) -> None:
        if self._engine.register_memory(address, length) != 0:
            raise TransportError(f"Mooncake refused to register {length} bytes at {address:#x}")

    def unregister(self, address: int) -> None:
        self._engine.unregister_memory(address)

    def read(self, segment: str, local_address: int, remote_address: int, length: int) -> None:
        offsets = range(0, length, _CHUNK_BYTES)
        sizes = [min(_CHUNK_BYTES, length - at) for at in offsets]
        rc = self._engine.batch_transfer_sync_read(
            segment,
            [local_address + at for at in offsets],
            [remote_address + at for at in offsets],
            sizes,
        )
        if rc != 0:
            raise TransportError(f"Mooncake read of {length} bytes from {segment} failed (rc {rc})")

    def close(self) -> None:
        pass  # the TransferEngine stops its threads when it is collected
