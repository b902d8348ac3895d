"""The engine-thread half of a transfer: find a chain of blocks, copy its pages out of whichever tier
holds them, and import received pages into the pool and the radix tree.

Every function here runs on the engine thread (through ``AsyncEngine.call``), so the tree cannot
change under it: a chain found and copied in one call cannot be evicted halfway through the copy.
What crosses threads is the staging region, which the caller owns until the call has returned.
Pages are ``[2, layers, page_size, kv_heads, head_dim]`` (``protocol.KVLayout.page_shape``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.engine import LLMEngine
from engine.kv.page_pool import OutOfPages
from engine.kv.prefix_cache import Node
from engine.models.attention import KVCache
from engine.transfer.protocol import KVLayout


def layout_of(engine: LLMEngine) -> KVLayout:
    k = engine.runner.kv.k  # [L, slots, KVH, D]
    layers, _, heads, dim = k.shape
    return KVLayout(
        engine.info.model_id,
        str(k.dtype).removeprefix("torch."),
        layers,
        engine.info.page_size,
        heads,
        dim,
        k.element_size(),
    )


def find_chain(engine: LLMEngine, namespace: str, block_hashes: Sequence[int]) -> list[tuple[Node, int]]:
    """The longest prefix of ``block_hashes`` that the namespace's tree holds in any tier, as
    ``(node, index of the block in node)``. Only ``namespace``'s root is searched: a block of
    another tenant never answers, whatever its hash."""
    root = engine.cache.roots.get(namespace)
    if root is None:
        return []
    chain: list[tuple[Node, int]] = []
    node, at = root, 0
    for block_hash in block_hashes:
        if at == len(node.hashes):  # past this node's blocks: the child whose first block it is
            child = next((c for c in node.children.values() if c.hashes and c.hashes[0] == block_hash), None)
            if child is None:
                break
            node, at = child, 0
        elif node.hashes[at] != block_hash:
            break
        chain.append((node, at))
        at += 1
    return chain


def held_blocks(engine: LLMEngine, token_ids: Sequence[int], namespace: str) -> int:
    """How many leading whole pages of ``token_ids`` this engine holds on the device."""
    pages, _ = engine.cache.match_prefix(token_ids, namespace)
    return len(pages)


def export_pages(
    engine: LLMEngine, namespace: str, block_hashes: Sequence[int], first_block: int, out: torch.Tensor
) -> int:
    """Copy the pages of blocks ``first_block ..`` of the chain into ``out`` (uint8, room for all of
    them), one after the other, from the device, the host pool or the disk tier. Returns how many
    consecutive blocks were copied (0 when the source does not hold block ``first_block``)."""
    layout = layout_of(engine)
    chain = find_chain(engine, namespace, block_hashes)[first_block:]
    if not chain:
        return 0
    staged = out[: len(chain) * layout.page_bytes].view(engine.runner.kv.k.dtype)
    staged = staged.view(len(chain), *layout.page_shape)  # [n, 2, L, ps, KVH, D]
    lower = engine.lower
    device: list[tuple[int, int]] = []  # (position in the chain, page)
    host: list[tuple[int, int]] = []
    for i, (node, at) in enumerate(chain):
        if node.on_device:
            device.append((i, node.pages[at]))
        elif node.host_pages is not None:
            host.append((i, node.host_pages[at]))
        else:
            assert lower is not None and lower.disk is not None and node.on_disk
            _, payload = lower.disk.read(node.hashes[at])  # checksummed by the disk tier itself
            staged[i].view(-1).view(torch.uint8).copy_(
                torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            )
    _gather(engine.runner.kv, device, staged, layout.page_size)
    if host:
        assert lower is not None
        _gather(lower.mover.host_kv, host, staged, layout.page_size)  # type: ignore[attr-defined]
    return len(chain)


def _gather(kv: KVCache, pages: list[tuple[int, int]], staged: torch.Tensor, page_size: int) -> None:
    if not pages:
        return
    positions = torch.tensor([i for i, _ in pages])
    slots = _slots([p for _, p in pages], page_size, kv.k.device)
    layers, _, heads, dim = kv.k.shape
    for j, tensor in enumerate((kv.k, kv.v)):
        picked = tensor.index_select(1, slots).view(layers, len(pages), page_size, heads, dim)
        staged[positions, j] = picked.transpose(0, 1).to("cpu")  # [n, L, ps, KVH, D]


def import_pages(
    engine: LLMEngine,
    token_ids: Sequence[int],
    namespace: str,
    first_block: int,
    staged_bytes: torch.Tensor,
) -> int:
    """Give the tree blocks ``first_block ..`` of ``token_ids`` (whole pages, their KV in
    ``staged_bytes``), under ``namespace``, after the ``first_block`` blocks this engine already
    holds. The tree announces the new blocks to its listener (KV events) like any stored block.
    Returns the blocks imported: 0 when the held part was evicted since it was counted, or the pool
    has no room even after evicting unlocked prefixes (the request recomputes instead)."""
    layout, cache, pool = layout_of(engine), engine.cache, engine.pool
    ps = layout.page_size
    num_blocks = staged_bytes.numel() // layout.page_bytes
    assert staged_bytes.numel() == num_blocks * layout.page_bytes
    assert len(token_ids) >= (first_block + num_blocks) * ps
    held, node = cache.match_prefix(token_ids[: first_block * ps], namespace)
    if len(held) < first_block:
        return 0
    cache.lock(node)  # what we hold stays while we make room for the rest
    try:
        if pool.num_free < num_blocks:
            cache.evict(num_blocks - pool.num_free)
        try:
            pages = pool.alloc(num_blocks)
        except OutOfPages:
            return 0
    finally:
        cache.unlock(node)
    staged = staged_bytes.view(engine.runner.kv.k.dtype).view(num_blocks, *layout.page_shape)
    kv = engine.runner.kv
    slots = _slots(pages, ps, kv.k.device)
    layers, _, heads, dim = kv.k.shape
    for j, tensor in enumerate((kv.k, kv.v)):
        rows = staged[:, j].transpose(0, 1).reshape(layers, num_blocks * ps, heads, dim)
        tensor.index_copy_(1, slots, rows.to(tensor.device))
    cache.insert(token_ids[: (first_block + num_blocks) * ps], held + pages, namespace)
    return num_blocks


def _slots(pages: list[int], page_size: int, device: torch.device) -> torch.Tensor:
    base = torch.tensor(pages, dtype=torch.long) * page_size
    return (base[:, None] + torch.arange(page_size)).reshape(-1).to(device)
