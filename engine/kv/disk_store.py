"""The disk tier: one file per KV page in a directory that outlives the engine. No tensors.

A page file is ``MAGIC | u32 header length | msgpack header | payload | u64 xxh3 of (header + payload)``.
The header says which block it is (chained hash, parent hash, namespace, token ids) and the KV layout
it was written with; the payload is the page's K and V as raw bytes. Files are written to a temporary
name and renamed, so a crash leaves either the old file or the new one, never half of one.

Invariant: ``read`` returns a payload only if its checksum and layout match; anything else (truncated,
corrupt, another model's layout) raises ``BadPageFile`` — a bad file is recomputed, never served.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import xxhash

log = logging.getLogger(__name__)

MAGIC = b"PGKVPAGE"
SUFFIX = ".kvpage"


class BadPageFile(ValueError):
    """A page file that is missing, truncated, corrupt or written for another KV layout."""


@dataclass(frozen=True)
class PageHeader:
    block_hash: int
    parent_hash: int | None  # None: the first block of its namespace
    namespace: str  # the cache salt
    token_ids: tuple[int, ...]


class DiskStore:
    """Page files named by block hash. ``layout`` names the KV shape and dtype; ``page_bytes`` is the
    payload size of one page. Only the engine thread calls it."""

    def __init__(self, directory: str | Path, capacity_pages: int, layout: str, page_bytes: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.capacity_pages = capacity_pages
        self.layout = layout
        self.page_bytes = page_bytes
        self.names: set[int] = set()  # block hashes with a file here
        self.read_bytes_per_s: float | None = None  # measured on every read (EWMA)

    @property
    def num_pages(self) -> int:
        return len(self.names)

    def _path(self, block_hash: int) -> Path:
        return self.directory / f"{block_hash:016x}{SUFFIX}"

    def write(self, header: PageHeader, payload: bytes) -> None:
        assert len(payload) == self.page_bytes, "a page file holds exactly one page"
        meta = msgpack.packb(
            [header.block_hash, header.parent_hash, header.namespace, list(header.token_ids), self.layout]
        )
        body = struct.pack("<I", len(meta)) + meta + payload
        path = self._path(header.block_hash)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC + body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body)))
        os.replace(tmp, path)
        self.names.add(header.block_hash)

    def read(self, block_hash: int) -> tuple[PageHeader, bytes]:
        """The page's header and payload; raises ``BadPageFile`` unless the file is whole and ours."""
        start = time.perf_counter()
        try:
            data = self._path(block_hash).read_bytes()
        except OSError as exc:
            raise BadPageFile(f"page {block_hash:016x}: {exc}") from None
        header, payload = self._parse(data, block_hash)
        seconds = time.perf_counter() - start
        if seconds > 0:
            rate = len(data) / seconds
            old = self.read_bytes_per_s
            self.read_bytes_per_s = rate if old is None else 0.8 * old + 0.2 * rate
        return header, payload

    def _parse(self, data: bytes, block_hash: int) -> tuple[PageHeader, bytes]:
        name = f"page file {block_hash:016x}"
        if len(data) < len(MAGIC) + 12 or not data.startswith(MAGIC):
            raise BadPageFile(f"{name}: truncated or not a page file")
        body, (checksum,) = data[len(MAGIC) : -8], struct.unpack("<Q", data[-8:])
        if xxhash.xxh3_64_intdigest(body) != checksum:
            raise BadPageFile(f"{name}: checksum mismatch")
        (meta_len,) = struct.unpack("<I", body[:4])
        try:
            block, parent, namespace, token_ids, layout = msgpack.unpackb(body[4 : 4 + meta_len])
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise BadPageFile(f"{name}: bad header: {exc}") from None
        payload = body[4 + meta_len :]
        if layout != self.layout or len(payload) != self.page_bytes or block != block_hash:
            raise BadPageFile(f"{name}: written for another KV layout ({layout})")
        return PageHeader(block, parent, namespace, tuple(token_ids)), payload

    def delete(self, block_hash: int) -> None:
        self.names.discard(block_hash)
        self._path(block_hash).unlink(missing_ok=True)

    def scan(self) -> list[PageHeader]:
        """Every good page file in the directory (a restart); bad ones are logged and deleted."""
        headers = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                block_hash = int(path.name.removesuffix(SUFFIX), 16)
                header, _ = self.read(block_hash)
            except (ValueError, BadPageFile) as exc:
                log.warning("KV disk tier: dropping %s (%s); its prefix will be recomputed", path.name, exc)
                path.unlink(missing_ok=True)
                continue
            headers.append(header)
            self.names.add(header.block_hash)
        return headers
