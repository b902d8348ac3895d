"""vLLM's own KV event code, loaded from the installed package, and the golden frames it encodes.

``scripts/setup.sh`` installs vLLM with ``--no-deps`` (its ~100 dependencies include CUDA torch and
transformers, and importing ``vllm.distributed`` pulls them in). Only ``vllm/distributed/kv_events.py``
runs here: it is executed from the installed file as it is, and its four vLLM imports are given for the
duration of the load: ``KVEventsConfig`` is vLLM's own class from ``vllm/config/kv_events.py`` under the
pydantic dataclass its ``@config`` makes, the logger is the standard library's, ``ExternalBlockHash``
is vLLM's alias (``bytes | int``), and the network helpers (only used to bind ``tcp://*:0``) raise.
The structs, their msgspec encoding and the ``ZmqEventPublisher`` (PUB, replay ROUTER, DP-rank ports)
are vLLM's.

The golden files (``golden/vllm-<version>-*.msgpack``) pin what that code encodes, so the tests that read
them run without vLLM; ``python -m tests.cache.index.vllm_kv_events`` writes them again (with vLLM).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import msgpack
import msgspec

from tests.cache.index.test_rekey import EngineRadix

GOLDEN_DIR = Path(__file__).parent / "golden"
VERSION = "0.33.0"  # the version scripts/setup.sh installs, and the one the golden files come from
ENCODINGS = ("maps", "arrays")


def golden_path(encoding: str) -> Path:
    return GOLDEN_DIR / f"vllm-{VERSION}-{encoding}.msgpack"


def golden_payloads(encoding: str) -> list[bytes]:
    """The pinned payloads, one per batch, in publishing order (the file is a msgpack array of them)."""
    return msgpack.unpackb(golden_path(encoding).read_bytes())


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None


def load() -> ModuleType | None:
    """vLLM's ``kv_events`` module, or None where vLLM is not installed."""
    spec = importlib.util.find_spec("vllm")  # a top-level spec: finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    from pydantic import ConfigDict
    from pydantic.dataclasses import dataclass

    def config(cls: type) -> type:  # vLLM's ``vllm.config.utils.config``
        return dataclass(cls, config=ConfigDict(extra="forbid"))

    def no_network(*args: object) -> None:
        raise NotImplementedError("vLLM's network helpers are not loaded (tcp://*:0 needs them)")

    given = {
        "vllm.config.utils": _module("vllm.config.utils", config=config),
        "vllm.logger": _module("vllm.logger", init_logger=logging.getLogger),
        "vllm.utils.network_utils": _module(
            "vllm.utils.network_utils",
            get_ip=no_network,
            get_tcp_uri=no_network,
            is_valid_ipv6_address=no_network,
            split_zmq_path=no_network,
        ),
        "vllm.v1.core.kv_cache_utils": _module("vllm.v1.core.kv_cache_utils", ExternalBlockHash=bytes | int),
    }
    with mock.patch.dict(sys.modules, given):
        given["vllm.config.kv_events"] = _exec(root / "config" / "kv_events.py", "vllm.config.kv_events")
        return _exec(root / "distributed" / "kv_events.py", "vllm_kv_events_under_test")


def _module(name: str, **attributes: Any) -> ModuleType:
    module = ModuleType(name)
    module.__dict__.update(attributes)
    return module


def _exec(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # msgspec and pydantic resolve annotations through it
    spec.loader.exec_module(module)
    return module


class VllmBlockPool(EngineRadix):
    """A vLLM prefix cache of ``block_size``-token blocks yielding vLLM's own events: blocks named by a
    chained SHA-256 (vLLM's default hash; opaque to the gateway), as bytes, or as vLLM's int form
    (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``: the digest's low 64 bits, big-endian)."""

    def __init__(self, kv: ModuleType, block_size: int = 16, int_hashes: bool = False) -> None:
        super().__init__(block_size)
        self.kv = kv
        self.int_hashes = int_hashes

    def page_hash(self, parent, page: list[int]):
        digest = hashlib.sha256(repr((parent, tuple(page), None)).encode()).digest()
        return int.from_bytes(digest, "big") & (2**64 - 1) if self.int_hashes else digest

    def stored(self, hashes: list, parent, tokens: list[int]):
        return self.kv.BlockStored(
            block_hashes=hashes,
            parent_block_hash=parent,
            token_ids=tokens,
            block_size=self.page_size,
            lora_id=None,
            medium=self.kv.MEDIUM_GPU,
            lora_name=None,
            group_idx=0,
        )

    def removed(self, hashes: list):
        return self.kv.BlockRemoved(block_hashes=hashes, medium=self.kv.MEDIUM_GPU, group_idx=0)


class VllmRank:
    """One DP rank of a vLLM server: its prefix cache and vLLM's own ``ZmqEventPublisher``, which
    connects its PUB to ``tcp://127.0.0.1:<pub + rank>`` and binds its replay ROUTER at ``replay + rank``.
    ``hwm``: tiny, so batches published while nobody reads are lost (and a gap shows)."""

    def __init__(self, kv: ModuleType, rank: int, pub: int, replay: int, hwm: int = 2) -> None:
        self.kv = kv
        self.engine = VllmBlockPool(kv)
        self.publisher = kv.ZmqEventPublisher(
            data_parallel_rank=rank,
            endpoint=f"tcp://127.0.0.1:{pub}",
            replay_endpoint=f"tcp://127.0.0.1:{replay}",
            hwm=hwm,
        )

    def publish(self, events: list) -> None:
        self.publisher.publish(self.kv.KVEventBatch(ts=time.time(), events=events))

    def close(self) -> None:
        self.publisher.shutdown()


# -- the golden frames ----------------------------------------------------------------------------------
SALT = "tenant-a"
LORA = "sql-adapter"
CHAIN_A = list(range(1000, 1048))  # 3 blocks of 16, stored under SALT
CHAIN_F = list(range(2000, 2016))  # one block continuing CHAIN_A's first two
CHAIN_B = list(range(3000, 3032))  # 2 blocks, LoRA LORA
CHAIN_C = list(range(4000, 4032))  # 2 blocks holding an image: not nameable by tokens
CHAIN_D = list(range(5000, 5032))  # stored after everything was cleared


def golden_batches(kv: ModuleType, encoding: str) -> list[bytes]:
    """Two batches of DP rank 1, as vLLM's publisher thread encodes them (``msgspec.msgpack.Encoder``):

    1. CHAIN_A stored on the GPU under a cache salt (vLLM sends it in the first block's extra keys),
       its first block also offloaded to CPU; CHAIN_F stored under CHAIN_A's second block; CHAIN_B stored
       by a LoRA adapter (its name in every block's extra keys); CHAIN_C holding an image (an
       ``(identifier, offset)`` pair in its first block's extra keys); CHAIN_A's third block removed.
    2. All blocks cleared, then CHAIN_D stored.

    ``maps`` is vLLM 0.33's wire form (events are tagged maps in an array-like batch); ``arrays`` sends
    each event as vLLM up to 0.10 declared them (``array_like=True``), over the installed version's fields.
    ``maps`` names blocks by SHA-256 bytes (vLLM's default), ``arrays`` by their int form."""
    int_hashes = encoding == "arrays"
    structs = _array_like(kv) if encoding == "arrays" else kv
    name = VllmBlockPool(kv, int_hashes=int_hashes).page_hash

    def chain(tokens: list[int], parent=None, extra: object = None) -> list:
        hashes = []
        for i in range(0, len(tokens), 16):
            parent = name(parent, [*tokens[i : i + 16], extra])  # the extra keys are in vLLM's hash
            hashes.append(parent)
        return hashes

    a = chain(CHAIN_A, extra=SALT)
    f = chain(CHAIN_F, parent=a[1])
    b = chain(CHAIN_B, extra=LORA)
    c = chain(CHAIN_C, extra="img")

    def stored(hashes, parent, tokens, medium="GPU", lora=None, extra_keys=None):
        return structs.BlockStored(
            block_hashes=hashes,
            parent_block_hash=parent,
            token_ids=tokens,
            block_size=16,
            lora_id=7 if lora else None,
            medium=medium,
            lora_name=lora,
            extra_keys=extra_keys,
            group_idx=0,
        )

    first = [
        stored(a, None, CHAIN_A, extra_keys=[(SALT,), None, None]),
        stored(a[:1], None, CHAIN_A[:16], medium="CPU", extra_keys=[(SALT,)]),
        stored(f, a[1], CHAIN_F),
        stored(b, None, CHAIN_B, lora=LORA, extra_keys=[(LORA,), (LORA,)]),
        stored(c, None, CHAIN_C, extra_keys=[(("img-sha256-0", 5),), (("img-sha256-0", -11),)]),
        structs.BlockRemoved(block_hashes=a[2:], medium="GPU", group_idx=0),
    ]
    d = chain(CHAIN_D)
    second = [structs.AllBlocksCleared(), stored(d, None, CHAIN_D)]
    encoder = msgspec.msgpack.Encoder()  # as ZmqEventPublisher._publisher_thread encodes
    return [
        encoder.encode(kv.KVEventBatch(ts=1_767_225_600.0 + i, events=events, data_parallel_rank=1))
        for i, events in enumerate((first, second))
    ]


def _array_like(kv: ModuleType) -> ModuleType:
    """The installed version's event structs, declared ``array_like=True`` as vLLM up to 0.10 did."""
    module = ModuleType("vllm_kv_events_array_like")
    for cls in (kv.BlockStored, kv.BlockRemoved, kv.AllBlocksCleared):
        fields = [
            (f.name, f.type) if f.required else (f.name, f.type, f.default)
            for f in msgspec.structs.fields(cls)
        ]
        twin = msgspec.defstruct(
            cls.__name__, fields, tag=True, array_like=True, omit_defaults=True, gc=False
        )
        setattr(module, cls.__name__, twin)
    return module


def main() -> None:
    kv = load()
    if kv is None or installed_version() != VERSION:
        raise SystemExit(f"needs vLLM {VERSION} installed (scripts/setup.sh), found {installed_version()}")
    for encoding in ENCODINGS:
        golden_path(encoding).write_bytes(msgpack.packb(golden_batches(kv, encoding)))
        print(golden_path(encoding))


if __name__ == "__main__":
    main()
