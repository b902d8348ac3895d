"""One engine's KV transfer service: its transport, registered buffers, exporter and fetcher.

Built by the server when ``--kv-transfer`` is on; ``start``/``close`` run in the server's lifecycle.
The service reads the engine's KV layout once (the pool's shape never changes) and otherwise reaches
the engine only through ``AsyncEngine.call``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from cache.api.kv_fields import FetchPlan
from engine.async_engine import AsyncEngine
from engine.transfer.buffer import TransferBuffer
from engine.transfer.config import TransferConfig
from engine.transfer.exporter import Exporter
from engine.transfer.fetcher import Fetcher, FetchOutcome
from engine.transfer.pages import layout_of
from engine.transfer.transport import KVTransport, create_transport


class TransferService:
    def __init__(
        self, engine: AsyncEngine, config: TransferConfig, transport: KVTransport | None = None
    ) -> None:
        """``transport``: the byte mover (the configured one, ``create_transport``, if None)."""
        self.config = config
        self.transport = transport or create_transport(config)
        self.layout = layout_of(engine.engine)
        pin = engine.engine.runner.kv.k.is_cuda  # host staging for a device pool: pinned
        self.export_buffer = TransferBuffer(config.export_buffer_mib * 2**20, self.transport, pin)
        self.import_buffer = TransferBuffer(config.import_buffer_mib * 2**20, self.transport, pin)
        self.exporter = Exporter(engine, self.export_buffer, self.transport, self.layout, config.lease_ttl_s)
        self.fetcher = Fetcher(
            engine, self.transport, self.import_buffer, self.layout, config.timeout_s, self._client
        )
        self._session: aiohttp.ClientSession | None = None
        self._expiry: asyncio.Task | None = None

    def _client(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the transfer service is not started"
        return self._session

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout)
        self._expiry = asyncio.create_task(self.exporter.run_expiry())

    async def close(self) -> None:
        await self.fetcher.close()
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        if self._session is not None:
            await self._session.close()
        self.export_buffer.close()
        self.import_buffer.close()
        self.transport.close()

    async def fetch(self, plan: FetchPlan, prompt_ids: Sequence[int], cache_salt: str) -> FetchOutcome:
        return await self.fetcher.fetch(plan, prompt_ids, cache_salt)

    def remote_prefill_params(
        self, prompt_ids: Sequence[int], cache_salt: str, request_id: str, host: str, port: int
    ) -> dict[str, Any]:
        """This engine prefilled a prompt for another to decode (disaggregation): the
        ``kv_transfer_params`` its answer carries, in vLLM's shape, for the decode side's request. They
        name this engine's control channel (``host:port``, its HTTP server) and the prompt's blocks by
        chained hash; the decode side turns them into a fetch plan and pulls what it lacks."""
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.transport.segment,
            "remote_request_id": request_id,
            "remote_block_ids": self.fetcher.fetchable_hashes(prompt_ids, cache_salt),
            "remote_host": host,
            "remote_port": port,
            "expires_at_ms": int((time.time() + self.config.lease_ttl_s) * 1000),
            "tp_size": 1,
        }

    def info(self) -> dict[str, Any]:
        """What ``GET /kv_transfer/info`` shows: the layout, the transport, what is held now, and what
        this engine's fetches measured (the gateway weighs fetch plans with it)."""
        return {
            "backend": self.transport.name,
            "segment": self.transport.segment,
            "layout": self.layout.to_json(),
            "export_buffer_bytes": self.export_buffer.num_bytes,
            "export_bytes_leased": self.export_buffer.used_bytes,
            "export_leases": len(self.exporter.leases),
            "expired_leases": self.exporter.expired_leases,
            "exported_blocks": self.exporter.exported_blocks,
            "import_buffer_bytes": self.import_buffer.num_bytes,
            "import_bytes_in_use": self.import_buffer.used_bytes,
            "fetch_cost": self.fetcher.cost.to_json(),
        }
