"""Chained block hashes over token ids: the names of KV blocks shared by the gateway and the engine.

Stable format, version 2 (do not change without bumping ``FORMAT_VERSION``, ``HASH_SCHEME`` and the tag):

* ``H(data, seed)`` is xxHash XXH3 64-bit (``xxhash.xxh3_64_intdigest``); hashes are unsigned 64-bit ints.
* Namespace bytes: ``b"prefixgate/kv/v2" || u32le(len(m)) || m || u32le(len(s)) || s`` where ``m`` is the
  model id and ``s`` the tenant salt, both UTF-8. The length prefixes make the encoding unambiguous, so
  ("ab", "c") and ("a", "bc") never collide by construction.
* ``h_0 = H(namespace bytes, 0)`` (``namespace_seed``). ``h_0`` names no block; it is the chain's root.
* ``h_i = H(u32le(t_{(i-1)B}) || ... || u32le(t_{iB-1}), seed=h_{i-1})`` for block ``i >= 1`` of ``B``
  (block size) tokens: the parent's hash is the seed of its child's. Only full blocks are hashed; a
  trailing partial block gets no hash.

Because every hash folds in its parent, ``h_i`` identifies the whole prefix ``t_0 .. t_{iB-1}`` in its
namespace: equal hashes mean equal prefixes (up to 64-bit collisions), which is what lets the radix index be a
flat dict keyed by hash. Tenants with different salts get disjoint hash spaces and cannot probe each other.

Version 1 hashed ``u64le(h_{i-1}) || tokens`` with seed 0. Passing the parent as XXH3's seed instead is the
same chain with one C call per block and no per-block bytes concatenation, which halved the cost of hashing
a prompt (the gateway hashes every request before routing it).

This module is imported by the engine to name its KV blocks in KV events, so it stays torch-free and depends
only on xxhash and numpy.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Sequence

import numpy as np
import xxhash

FORMAT_VERSION = 2
DEFAULT_BLOCK_SIZE = 16
_NAMESPACE_TAG = b"prefixgate/kv/v2"
# What an engine reports as ``kv_block_hash`` in /get_server_info: a gateway ingests a worker's KV events only
# when this is equal to its own, since hashes of another scheme would never match the prompts it hashes.
HASH_SCHEME = "prefixgate/kv/v2 xxh3-64 seeded-chain"

_xxh3 = xxhash.xxh3_64_intdigest

# array("I") is the fastest way from a Python list of ints to packed u32 (about 3x faster than
# np.asarray on a list); it is native-endian, so big-endian hosts byte-swap. "I" is 4 bytes on every
# platform CPython supports, asserted rather than assumed.
assert array.array("I").itemsize == 4
_NATIVE_LITTLE = sys.byteorder == "little"


def namespace_seed(model_id: str, tenant_salt: str = "") -> int:
    """Return ``h_0`` for a model and tenant: the root every block chain of theirs starts from."""
    model = model_id.encode("utf-8")
    salt = tenant_salt.encode("utf-8")
    payload = b"".join(
        (_NAMESPACE_TAG, len(model).to_bytes(4, "little"), model, len(salt).to_bytes(4, "little"), salt)
    )
    return _xxh3(payload)


def _packed_u32le(token_ids: Sequence[int] | np.ndarray) -> array.array | np.ndarray:
    """``token_ids`` as a contiguous u32 little-endian buffer; OverflowError/ValueError outside [0, 2**32)."""
    if isinstance(token_ids, np.ndarray):
        if token_ids.size and (token_ids.min() < 0 or token_ids.max() > 0xFFFFFFFF):
            raise ValueError("token ids must fit in u32")
        return np.ascontiguousarray(token_ids, dtype="<u4")
    packed = array.array("I", token_ids)
    if not _NATIVE_LITTLE:
        packed.byteswap()
    return packed


def block_hashes(
    token_ids: Sequence[int] | np.ndarray,
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    seed: int,
    parent: int | None = None,
) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids``: ``[h_1, ..., h_n]`` with ``n = len // block_size``.

    ``seed`` is the namespace root (``namespace_seed(model_id, tenant_salt)``). To continue an existing
    chain (e.g. hash only the reply appended after a prompt whose last block hash is known), pass that hash
    as ``parent``: the chain then starts from it instead of ``seed``, and ``token_ids`` must start at a block
    boundary. ``block_hashes(a + b, seed=s) == x + block_hashes(b, seed=s, parent=x[-1])`` when
    ``len(a) % block_size == 0`` and ``x = block_hashes(a, seed=s)``.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    n_tokens = len(token_ids) // block_size * block_size
    if n_tokens == 0:
        return []
    if n_tokens != len(token_ids):
        token_ids = token_ids[:n_tokens]
    # One C call splits the packed ids into per-block bytes objects (a void dtype of one block's width);
    # the chain itself cannot be vectorised, so the loop is one XXH3 call per block (~50 ns).
    blocks = np.frombuffer(_packed_u32le(token_ids), dtype=f"V{block_size * 4}").tolist()
    h = seed if parent is None else parent
    out: list[int] = []
    append = out.append
    for block in blocks:
        h = _xxh3(block, h)
        append(h)
    return out


def prompt_block_hashes(
    token_ids: Sequence[int] | np.ndarray,
    model_id: str,
    tenant_salt: str = "",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> list[int]:
    """Convenience: ``block_hashes`` rooted at ``namespace_seed(model_id, tenant_salt)``."""
    return block_hashes(token_ids, block_size, seed=namespace_seed(model_id, tenant_salt))
