"""Registered staging memory for KV transfers, handed out in regions.

The KV pool is laid out layer by layer (``[layers, slots, kv_heads, head_dim]`` for K and for V), so
one page is ``2 x layers`` strided pieces; staging a chain's pages contiguously turns a transfer into
one read of a few large slices, which is what a TCP transport needs. A region is owned by exactly
one transfer from ``reserve`` to ``free``; a full buffer refuses (``reserve`` returns None): that is
the transfer's backpressure, and the caller falls back (reader) or answers busy (source). Only the
event loop's thread reserves and frees regions.
"""

from __future__ import annotations

import asyncio

import torch

from engine.transfer.transport import KVTransport

_ALIGN = 4096


class TransferBuffer:
    def __init__(self, num_bytes: int, transport: KVTransport, pin_memory: bool = False) -> None:
        self.tensor = torch.zeros(num_bytes, dtype=torch.uint8, pin_memory=pin_memory)
        self.address = self.tensor.data_ptr()
        self.num_bytes = num_bytes
        self._transport = transport
        transport.register(self.address, num_bytes)
        self._free: list[tuple[int, int]] = [(0, num_bytes)]  # (offset, length), sorted, coalesced
        self.used_bytes = 0

    def reserve(self, num_bytes: int) -> tuple[int, int] | None:
        """A region ``(offset, length)`` of at least ``num_bytes``, first fit; None when none is free."""
        length = -(-num_bytes // _ALIGN) * _ALIGN
        for i, (offset, size) in enumerate(self._free):
            if size >= length:
                if size == length:
                    del self._free[i]
                else:
                    self._free[i] = (offset + length, size - length)
                self.used_bytes += length
                return offset, length
        return None

    def free(self, region: tuple[int, int]) -> None:
        offset, length = region
        assert all(offset + length <= o or o + s <= offset for o, s in self._free), "region freed twice"
        self._free.append(region)
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for o, s in self._free:
            if merged and merged[-1][0] + merged[-1][1] == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + s)
            else:
                merged.append((o, s))
        self._free = merged
        self.used_bytes -= length

    def free_when_done(self, region: tuple[int, int], users: list[asyncio.Future]) -> None:
        """Free ``region`` once every user (an engine call, a transport read in a thread) that may
        still write or read it has finished: a cancelled transfer must not hand out memory that a
        late copy then overwrites."""
        pending = [u for u in users if not u.done()]
        if not pending:
            self.free(region)
            return
        gathered = asyncio.gather(*pending, return_exceptions=True)
        gathered.add_done_callback(lambda _: self.free(region))

    def view(self, region: tuple[int, int], num_bytes: int) -> torch.Tensor:
        offset, length = region
        assert num_bytes <= length
        return self.tensor[offset : offset + num_bytes]

    def close(self) -> None:
        self._transport.unregister(self.address)
