"""The source side of a transfer: stage a chain's pages for a reader and hold them until it confirms.

An export is a *lease* on a region of the registered export buffer: the pages are copied into it on
the engine thread (so eviction cannot free them mid-copy, and afterwards the tree may evict them
freely: the reader reads the staged copy), checksummed, and kept until the reader releases the lease
or ``lease_ttl_s`` passes (a reader that died, SIGKILL included, never releases: the expiry frees it).

Runs on the server's event loop; only ``pages.export_pages`` touches the engine, through
``AsyncEngine.call``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

import xxhash

from engine.async_engine import AsyncEngine
from engine.transfer import pages
from engine.transfer.buffer import TransferBuffer
from engine.transfer.protocol import ExportReply, ExportRequest, KVLayout
from engine.transfer.transport import KVTransport

log = logging.getLogger(__name__)


class ExportRefused(Exception):
    """Why an export cannot be served; ``status`` is the HTTP status the control channel answers."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class Lease:
    lease_id: str
    region: tuple[int, int]
    expires_at: float  # time.monotonic()


class Exporter:
    def __init__(
        self,
        engine: AsyncEngine,
        buffer: TransferBuffer,
        transport: KVTransport,
        layout: KVLayout,
        lease_ttl_s: float,
    ) -> None:
        self.engine, self.buffer, self.transport = engine, buffer, transport
        self.layout, self.lease_ttl_s = layout, lease_ttl_s
        self.leases: dict[str, Lease] = {}
        self.exported_blocks = 0
        self.expired_leases = 0

    async def export(self, request: ExportRequest) -> ExportReply:
        """Stage the blocks; raises ``ExportRefused`` (409 layout, 404 not held, 503 buffer full)."""
        if request.layout != self.layout:
            raise ExportRefused(
                409, "layout_mismatch", f"this engine's KV layout is {self.layout}, not {request.layout}"
            )
        wanted = len(request.block_hashes) - request.first_block
        region = self.buffer.reserve(wanted * self.layout.page_bytes)
        if region is None:
            raise ExportRefused(503, "busy", "the export buffer is full; retry later or recompute")
        out = self.buffer.view(region, wanted * self.layout.page_bytes)
        staging = asyncio.ensure_future(
            self.engine.call(
                lambda engine: pages.export_pages(
                    engine, request.namespace, request.block_hashes, request.first_block, out
                )
            )
        )
        try:
            found = await asyncio.shield(staging)  # cancelled or not, the copy runs to its end
            if found == 0:
                raise ExportRefused(404, "blocks_missing", "this engine does not hold those blocks")
            size = self.layout.page_bytes
            checksums = await asyncio.to_thread(
                lambda: [
                    xxhash.xxh3_64_intdigest(out[i * size : (i + 1) * size].numpy()) for i in range(found)
                ]
            )
        except BaseException:
            self.buffer.free_when_done(region, [staging])
            raise
        lease = Lease(uuid.uuid4().hex, region, time.monotonic() + self.lease_ttl_s)
        self.leases[lease.lease_id] = lease
        self.exported_blocks += found
        return ExportReply(
            lease.lease_id,
            self.transport.segment,
            self.buffer.address + region[0],
            request.first_block,
            found,
            checksums,
            self.layout,
            int(self.lease_ttl_s * 1000),
        )

    def release(self, lease_id: str) -> bool:
        """The reader is done with the lease (read or gave up). False if it had expired already."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return False
        self.buffer.free(lease.region)
        return True

    def expire(self, now: float | None = None) -> int:
        """Free leases past their expiry; returns how many."""
        now = time.monotonic() if now is None else now
        expired = [lease for lease in self.leases.values() if lease.expires_at <= now]
        for lease in expired:
            log.warning("KV export lease %s expired unreleased: its reader is gone", lease.lease_id)
            self.release(lease.lease_id)
        self.expired_leases += len(expired)
        return len(expired)

    async def run_expiry(self) -> None:
        """Expire leases until cancelled (a task of the server's lifecycle)."""
        while True:
            await asyncio.sleep(min(1.0, self.lease_ttl_s / 4))
            self.expire()
