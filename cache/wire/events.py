"""KV cache events as vLLM and SGLang publish them, with msgpack codecs (no msgspec needed).

vLLM defines these as msgspec Structs with ``tag=True`` (the class name is the tag). Older vLLM and SGLang
add ``array_like=True``, so each event is an array ``["BlockStored", block_hashes, parent_block_hash,
token_ids, block_size, lora_id, medium, lora_name, ...]`` and a batch is ``[ts, events, data_parallel_rank]``;
newer vLLM (0.33) sends each event as a map ``{"type": "BlockStored", "block_hashes": ...}`` inside an
array-like batch, and SGLang 0.5.23 sends maps for both. Decoders accept every mix; trailing fields may be
missing (SGLang has no ``medium``; old vLLM no ``lora_name``) and unknown extra fields (vLLM's
``group_idx``, ``session_id``, ...) are ignored, as msgspec does. The encoder writes the array-like form,
which every version decodes.

Block hashes: vLLM sends ints (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``), or bytes (sha256 digests) by
default in newer versions, and very old versions sent signed Python ``hash()`` values. All are normalised to
unsigned 64-bit ints: bytes as vLLM's own int conversion does (big-endian, low 64 bits), so one block gets
the same id whichever way its worker publishes it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import msgpack

logger = logging.getLogger(__name__)

_U64 = (1 << 64) - 1


def normalize_block_hash(value: int | bytes) -> int:
    """vLLM ExternalBlockHash (int or bytes) -> unsigned 64-bit int."""
    if isinstance(value, bytes | bytearray):
        return int.from_bytes(value, "big") & _U64
    if isinstance(value, int):
        return value & _U64
    raise TypeError(f"block hash must be int or bytes, got {type(value).__name__}")


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None  # None or "GPU": device memory; "CPU": host memory (KV offloading)
    lora_name: str | None = None
    cache_salt: str | None = None  # SGLang (map encoding): the salt of the request that stored them
    # vLLM: per block, what else its hash covers (LoRA name, (mm identifier, offset) pairs, the request's
    # cache salt on a chain's first block, prompt-embeds digests); None where nothing else
    extra_keys: list[list[Any] | None] | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: list[int]
    medium: str | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


# Field order of each tagged struct, as in vLLM's definitions (array-like encoding follows this order).
_FIELDS: dict[str, tuple[str, ...]] = {
    "BlockStored": (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
        "extra_keys",
    ),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}
_REQUIRED = {"BlockStored": 4, "BlockRemoved": 1, "AllBlocksCleared": 0}
_TAG_FIELD = "type"  # msgspec's default tag field for map-encoded tagged structs


class EventDecodeError(ValueError):
    """A payload that is not a KV event batch in either encoding."""


def _fields_of(obj: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(obj, list | tuple):
        if not obj or not isinstance(obj[0], str):
            raise EventDecodeError(f"array-like event must start with its tag, got {obj!r:.80}")
        tag = obj[0]
        names = _FIELDS.get(tag, ())
        return tag, dict(zip(names, obj[1:], strict=False))
    if isinstance(obj, dict):
        tag = obj.get(_TAG_FIELD)
        if not isinstance(tag, str):
            raise EventDecodeError(f"map event without a {_TAG_FIELD!r} tag: {obj!r:.80}")
        return tag, obj
    raise EventDecodeError(f"event must be an array or a map, got {type(obj).__name__}")


def decode_event(obj: Any) -> KVEvent | None:
    """One decoded-msgpack event -> KVEvent; None for an unknown tag (newer publisher; skipped)."""
    tag, fields = _fields_of(obj)
    if tag not in _FIELDS:
        logger.debug("skipping unknown KV event type %r", tag)
        return None
    missing = [name for name in _FIELDS[tag][: _REQUIRED[tag]] if name not in fields]
    if missing:
        raise EventDecodeError(f"{tag} is missing {missing}")
    try:
        if tag == "BlockStored":
            parent = fields["parent_block_hash"]
            return BlockStored(
                block_hashes=[normalize_block_hash(h) for h in fields["block_hashes"]],
                parent_block_hash=None if parent is None else normalize_block_hash(parent),
                token_ids=list(fields["token_ids"]),
                block_size=int(fields["block_size"]),
                lora_id=fields.get("lora_id"),
                medium=fields.get("medium"),
                lora_name=fields.get("lora_name"),
                cache_salt=salt if isinstance(salt := fields.get("cache_salt"), str) else None,
                extra_keys=_extra_keys(fields.get("extra_keys"), len(fields["block_hashes"])),
            )
        if tag == "BlockRemoved":
            return BlockRemoved(
                [normalize_block_hash(h) for h in fields["block_hashes"]], fields.get("medium")
            )
    except (TypeError, ValueError) as exc:
        raise EventDecodeError(f"bad {tag}: {exc}") from exc
    return AllBlocksCleared()


def _extra_keys(value: Any, blocks: int) -> list[list[Any] | None] | None:
    """vLLM's per-block extra keys: None, or one array (or None) per block; anything else is malformed."""
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != blocks:
        raise EventDecodeError("BlockStored.extra_keys must hold one entry per block")
    if not all(keys is None or isinstance(keys, list | tuple) for keys in value):
        raise EventDecodeError("BlockStored.extra_keys entries must be arrays or nil")
    return [None if keys is None else list(keys) for keys in value]


def decode_event_batch(payload: bytes) -> EventBatch:
    """A ZMQ payload (msgpack EventBatch, array-like or map) -> EventBatch. Raises EventDecodeError."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for corrupt input
        raise EventDecodeError(f"not msgpack: {exc}") from exc
    if isinstance(obj, list | tuple):
        if len(obj) < 2:
            raise EventDecodeError("array-like EventBatch needs [ts, events]")
        ts, raw_events, dp_rank = obj[0], obj[1], obj[2] if len(obj) > 2 else None
    elif isinstance(obj, dict):
        if "ts" not in obj or "events" not in obj:
            raise EventDecodeError("map EventBatch needs ts and events")
        ts, raw_events, dp_rank = obj["ts"], obj["events"], obj.get("data_parallel_rank")
    else:
        raise EventDecodeError(f"EventBatch must be an array or a map, got {type(obj).__name__}")
    if not isinstance(raw_events, list | tuple):
        raise EventDecodeError("EventBatch.events must be an array")
    events = [event for event in map(decode_event, raw_events) if event is not None]
    return EventBatch(float(ts), events, dp_rank)


def _event_to_array(event: KVEvent) -> list[Any]:
    if isinstance(event, BlockStored):
        return [
            "BlockStored",
            event.block_hashes,
            event.parent_block_hash,
            event.token_ids,
            event.block_size,
            event.lora_id,
            event.medium,
            event.lora_name,
            *([] if event.extra_keys is None else [event.extra_keys]),
        ]
    if isinstance(event, BlockRemoved):
        return ["BlockRemoved", event.block_hashes, event.medium]
    return ["AllBlocksCleared"]


def encode_event_batch(batch: EventBatch) -> bytes:
    """EventBatch -> vLLM's array-like msgpack (``data_parallel_rank`` omitted when None, as msgspec does)."""
    body: list[Any] = [batch.ts, [_event_to_array(e) for e in batch.events]]
    if batch.data_parallel_rank is not None:
        body.append(batch.data_parallel_rank)
    return msgpack.packb(body, use_bin_type=True)


def encode_event_batch_map(batch: EventBatch) -> bytes:
    """EventBatch -> the map encoding of newer vLLM (for tests and for peers that expect it)."""
    events: list[dict[str, Any]] = []
    for event in batch.events:
        values: Sequence[Any] = _event_to_array(event)
        events.append({_TAG_FIELD: values[0], **dict(zip(_FIELDS[values[0]], values[1:], strict=False))})
    body: dict[str, Any] = {"ts": batch.ts, "events": events}
    if batch.data_parallel_rank is not None:
        body["data_parallel_rank"] = batch.data_parallel_rank
    return msgpack.packb(body, use_bin_type=True)
