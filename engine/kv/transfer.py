"""Copies of KV pages between tiers: the device pool, the host pool and page bytes for the disk tier.

Both pools have the runner's layout, ``[layers, num_pages * page_size, kv_heads, head_dim]`` for K and
for V, so page ``p`` is slots ``p * page_size .. (p + 1) * page_size - 1`` in either. On CUDA the host
pool is pinned memory and copies go through one side stream that the compute stream waits on, so
a load-back is ordered before the forward pass that reads it. Every copy is timed: the load-back
policy weighs the measured bandwidth against the measured prefill rate.
"""

from __future__ import annotations

import time

import torch

from engine.models.attention import KVCache


def allocate_host_kv(device_kv: KVCache, num_pages: int, page_size: int) -> KVCache:
    """A host pool of ``num_pages`` pages shaped like ``device_kv`` (pinned when the device is CUDA)."""
    layers, _, heads, dim = device_kv.k.shape
    shape = (layers, num_pages * page_size, heads, dim)
    pin = device_kv.k.is_cuda
    return KVCache(
        torch.zeros(shape, dtype=device_kv.k.dtype, pin_memory=pin),
        torch.zeros(shape, dtype=device_kv.k.dtype, pin_memory=pin),
    )


class KVTransfer:
    """The only code that moves KV between tiers (on the engine thread). Implements ``PageMover``."""

    def __init__(self, device_kv: KVCache, host_kv: KVCache, page_size: int) -> None:
        self.device_kv, self.host_kv, self.page_size = device_kv, host_kv, page_size
        layers, _, heads, dim = device_kv.k.shape
        self.page_shape = (2, layers, page_size, heads, dim)  # K and V of one page
        self.page_bytes = device_kv.k.element_size() * 2 * layers * page_size * heads * dim
        self.layout = f"{str(device_kv.k.dtype).removeprefix('torch.')}:{layers}x{page_size}x{heads}x{dim}"
        self._stream = torch.cuda.Stream(device_kv.k.device) if device_kv.k.is_cuda else None
        self.copy_bytes_per_s: float | None = None  # host <-> device, measured (EWMA)
        self._measure()

    def _slots(self, pages: list[int], device: torch.device) -> torch.Tensor:
        base = torch.tensor(pages, dtype=torch.long) * self.page_size
        slots = (base[:, None] + torch.arange(self.page_size)).reshape(-1)
        return slots.to(device)

    def _copy(self, src: KVCache, src_pages: list[int], dst: KVCache, dst_pages: list[int]) -> None:
        assert len(src_pages) == len(dst_pages)
        if not src_pages:
            return
        start = time.perf_counter()
        src_slots, dst_slots = self._slots(src_pages, src.k.device), self._slots(dst_pages, dst.k.device)
        if self._stream is None:
            for a, b in ((src.k, dst.k), (src.v, dst.v)):
                b.index_copy_(1, dst_slots, a.index_select(1, src_slots))
        else:  # a side stream, then the compute stream waits for it
            compute = torch.cuda.current_stream(self.device_kv.k.device)
            self._stream.wait_stream(compute)  # the pages it reads (or overwrites) are settled
            with torch.cuda.stream(self._stream):
                for a, b in ((src.k, dst.k), (src.v, dst.v)):
                    b.index_copy_(1, dst_slots, a.index_select(1, src_slots).to(b.device, non_blocking=True))
            compute.wait_stream(self._stream)
            self._stream.synchronize()  # the timing below is the copy's, and host buffers are reusable
        self._observe(len(src_pages) * self.page_bytes, time.perf_counter() - start)

    def _observe(self, num_bytes: int, seconds: float) -> None:
        if seconds <= 0:
            return
        rate, old = num_bytes / seconds, self.copy_bytes_per_s
        self.copy_bytes_per_s = rate if old is None else 0.8 * old + 0.2 * rate

    def _measure(self) -> None:
        """One timed round trip of page 0 at start-up (before any page holds KV), so that the first
        load-back decision is measured too."""
        if self.host_kv.k.shape[1] >= self.page_size and self.device_kv.k.shape[1] >= self.page_size:
            self.to_host([0], [0])
            self.to_device([0], [0])

    # -- PageMover ------------------------------------------------------------------------------------
    def to_host(self, device_pages: list[int], host_pages: list[int]) -> None:
        self._copy(self.device_kv, device_pages, self.host_kv, host_pages)

    def to_device(self, host_pages: list[int], device_pages: list[int]) -> None:
        self._copy(self.host_kv, host_pages, self.device_kv, device_pages)

    def read_page(self, page: int, on_host: bool) -> bytes:
        """One page's K and V as bytes (for a page file)."""
        kv = self.host_kv if on_host else self.device_kv
        rows = slice(page * self.page_size, (page + 1) * self.page_size)
        both = torch.stack([kv.k[:, rows], kv.v[:, rows]]).cpu()  # [2, L, page_size, KVH, D]
        return both.contiguous().view(torch.uint8).numpy().tobytes()

    def write_page_to_device(self, page: int, data: bytes) -> None:
        """Load one page's bytes (from a page file) into a device page."""
        both = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(self.device_kv.k.dtype)
        both = both.reshape(self.page_shape).to(self.device_kv.k.device)
        rows = slice(page * self.page_size, (page + 1) * self.page_size)
        self.device_kv.k[:, rows], self.device_kv.v[:, rows] = both[0], both[1]
