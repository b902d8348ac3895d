"""The control protocol between engines (version 1, documented in ``docs/kv-transfer.md``).

JSON over HTTP on the source engine's server: the reader asks ``POST /kv_transfer/export`` for the
pages of a chain of block hashes, the source stages them in its registered export buffer and answers
where they are (a lease), the reader pulls the bytes with the transport and confirms with
``POST /kv_transfer/release``. Both sides check the KV layout header (model, dtype, shape) before any
byte is read, and every page carries an xxh3 checksum of its bytes.

Page format on the wire: K then V of one page, ``[2, layers, page_size, kv_heads, head_dim]`` in the
engine's KV dtype, C order: the same bytes as a page file of the disk tier.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A control message that does not follow this protocol version."""


@dataclass(frozen=True)
class KVLayout:
    """What a page's bytes mean. Two engines may exchange pages only if their layouts are equal."""

    model_id: str
    dtype: str  # torch's name without the prefix: "float32", "bfloat16"
    layers: int
    page_size: int
    kv_heads: int
    head_dim: int
    element_bytes: int

    @property
    def page_shape(self) -> tuple[int, int, int, int, int]:
        return (2, self.layers, self.page_size, self.kv_heads, self.head_dim)

    @property
    def page_bytes(self) -> int:
        return 2 * self.layers * self.page_size * self.kv_heads * self.head_dim * self.element_bytes

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> KVLayout:
        try:
            return cls(**data)
        except TypeError as exc:
            raise ProtocolError(f"bad KV layout header: {exc}") from None


@dataclass(frozen=True)
class ExportRequest:
    """Reader -> source: stage blocks ``first_block ..`` of the chain ``block_hashes`` (from the
    namespace's root) for me. ``first_block`` skips what the reader already holds."""

    plan_id: str
    namespace: str  # the cache salt whose tree the chain is looked up in (never another one)
    block_hashes: list[int]
    first_block: int
    layout: KVLayout  # the reader's; the source refuses a different one (409)
    version: int = PROTOCOL_VERSION

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "layout": self.layout.to_json()}

    @classmethod
    def from_json(cls, data: Any) -> ExportRequest:
        if not isinstance(data, dict) or data.get("version") != PROTOCOL_VERSION:
            raise ProtocolError(f"expected a version {PROTOCOL_VERSION} export request")
        hashes, first = data.get("block_hashes"), data.get("first_block")
        if not isinstance(hashes, list) or not all(isinstance(h, int) and 0 <= h < 2**64 for h in hashes):
            raise ProtocolError("'block_hashes' must be a list of unsigned 64-bit integers")
        if not isinstance(first, int) or not 0 <= first < len(hashes):
            raise ProtocolError("'first_block' must index 'block_hashes'")
        if not isinstance(data.get("plan_id"), str) or not isinstance(data.get("namespace"), str):
            raise ProtocolError("'plan_id' and 'namespace' must be strings")
        return cls(data["plan_id"], data["namespace"], hashes, first, KVLayout.from_json(data.get("layout")))


@dataclass(frozen=True)
class ExportReply:
    """Source -> reader: ``num_blocks`` pages (blocks ``first_block ..``; fewer than asked when the
    source holds only the start of the chain) lie at ``address`` in the source's registered memory,
    one after the other, ``layout.page_bytes`` each, until the lease is released or expires."""

    lease_id: str
    segment: str  # the transport's name for the source's memory (Mooncake: "host:rpc_port")
    address: int
    first_block: int
    num_blocks: int
    checksums: list[int]  # xxh3_64 of each page's bytes
    layout: KVLayout
    lease_ttl_ms: int
    version: int = PROTOCOL_VERSION

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "layout": self.layout.to_json()}

    @classmethod
    def from_json(cls, data: Any) -> ExportReply:
        if not isinstance(data, dict) or data.get("version") != PROTOCOL_VERSION:
            raise ProtocolError(f"expected a version {PROTOCOL_VERSION} export reply")
        try:
            reply = cls(**{**data, "layout": KVLayout.from_json(data.get("layout"))})
        except TypeError as exc:
            raise ProtocolError(f"bad export reply: {exc}") from None
        if reply.num_blocks < 1 or len(reply.checksums) != reply.num_blocks:
            raise ProtocolError("an export reply names one checksum per block, and at least one block")
        return reply
