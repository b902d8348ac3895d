"""Another engine's KV blocks, renamed with the gateway's own chained hashes.

SGLang names a page by a chained SHA-256 truncated to int64, vLLM by sha256 or xxhash over its own
block size; neither equals what the gateway computes for a prompt (``cache.wire.hashing``). But their
``BlockStored`` events carry each block's token ids and its parent, which is all it takes to name the
same prefix the gateway's way: walk the parent chain, accumulate tokens, and every time 16 of them
(``block_size``) are complete, hash them seeded with the previous gateway hash. Any engine block size
works: SGLang's default page of 1 token completes a gateway block every 16th page, vLLM's 32-token
blocks complete two each; sizes that do not divide carry the remainder to the child.

Exactness needs the gateway's block for that worker to end where the engine's pages end: a query that
shares the first 16 tokens of a 32-token page cannot reuse them, because the engine reuses whole pages.
So a worker with pages of ``P`` tokens is hashed in blocks of ``lcm(16, P)`` (``gateway_block_size``):
16 for SGLang's default page of 1 and for vLLM's 16, 32 or 64 for engines with larger pages. The
gateway hashes requests for that worker with the same size, so matches count only reusable pages.

``ForeignBlockNamer`` does this for one event stream (one worker, one DP rank). It keeps, per engine
block hash, the chain state after that block (the open tail of < ``block_size`` tokens, the last
gateway hash, the namespace), which gateway blocks that engine block completed, and in which tiers the
engine holds it, so that ``BlockRemoved`` by the engine's hash removes the right gateway blocks.

Invariants:

* A gateway block is held in a tier while at least one engine block that completed it is held there
  (reference counts per tier: two engine hashes may name the same tokens, e.g. SGLang namespaces its
  hashes by an extra key the gateway does not see).
* A block whose parent is unknown (the stream was joined mid-way, or the parent was purged) cannot be
  named: it is skipped and counted, as are its descendants. A gap in the stream is handled above this
  class (the worker is purged and ``reset`` called), so skipping only loses hits, never invents them.
* Memory is bounded by ``max_blocks`` engine blocks; beyond it the namer resets and the worker's
  entries are purged (``ClearedOp``): an index that forgets is safe, one that is wrong is not.
* Namespaces: a block stored with ``cache_salt`` s (SGLang's field; vLLM sends the salt in the chain's
  first block's ``extra_keys``) is rooted at ``namespace_seed(model_id, s)``, as the gateway hashes a
  tenant's prompts (it sends the tenant's salt as ``cache_salt``); a LoRA block is rooted at its
  adapter's name, as requests naming that adapter as their model are hashed.
* A block whose KV depends on more than its tokens (vLLM's ``extra_keys`` naming an image or prompt
  embeddings) is skipped and counted like an unknown parent, and so are its descendants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cache.index.ops import ClearedOp, IndexOp, RemovedOp, StoredOp
from cache.wire.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from cache.wire.hashing import DEFAULT_BLOCK_SIZE, block_hashes, namespace_seed
from cache.wire.tiers import Tier, tier_from_medium


def gateway_block_size(engine_page_size: int, base: int = DEFAULT_BLOCK_SIZE) -> int:
    """The block size to hash a worker's prefixes in: the smallest multiple of ``base`` that is also a
    whole number of the engine's pages, so every matched block is reusable by the engine as it is."""
    return math.lcm(base, max(1, engine_page_size))


@dataclass(slots=True)
class _EngineBlock:
    """The gateway chain state right after one engine block."""

    root: int  # namespace seed of the chain this block is in
    last: int  # the last complete gateway hash (``root`` before the first)
    tail: tuple[int, ...]  # tokens after ``last``, fewer than a gateway block
    completed: tuple[int, ...]  # gateway hashes this engine block completed
    tiers: set[Tier] = field(default_factory=set)


@dataclass
class NamerStats:
    stored: int = 0  # engine blocks named
    unresolved: int = 0  # engine blocks skipped: unknown parent, or no token ids to name them by
    resets: int = 0  # over max_blocks


class ForeignBlockNamer:
    def __init__(
        self,
        worker_id: str,
        model_id: str,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_blocks: int = 4_000_000,
        refs: dict[tuple[int, Tier], int] | None = None,
    ) -> None:
        """``refs``: reference counts shared with the namers of the worker's other DP ranks (see
        ``ForeignWorkerNames``); by default this namer's own."""
        self.worker_id = worker_id
        self.model_id = model_id
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.stats = NamerStats()
        self._blocks: dict[int, _EngineBlock] = {}
        # (gateway hash, tier) -> engine blocks holding it
        self._refs: dict[tuple[int, Tier], int] = {} if refs is None else refs

    def __len__(self) -> int:
        return len(self._blocks)

    def reset(self) -> None:
        """Forget everything (the caller purges the worker's index entries)."""
        self._blocks.clear()
        self._refs.clear()

    def ops(self, event: KVEvent) -> list[IndexOp]:
        """The index ops, in the gateway's names, that ``event`` implies."""
        if isinstance(event, BlockStored):
            return self._stored(event)
        if isinstance(event, BlockRemoved):
            return self._removed(event.block_hashes, tier_from_medium(event.medium))
        if isinstance(event, AllBlocksCleared):
            self.reset()
            return [ClearedOp(self.worker_id)]
        raise TypeError(f"not a KV event: {event!r}")

    # -- stored ---------------------------------------------------------------------------------------
    def _stored(self, event: BlockStored) -> list[IndexOp]:
        tier = tier_from_medium(event.medium)
        size, tokens = event.block_size, event.token_ids
        if size < 1 or len(tokens) != size * len(event.block_hashes):
            self.stats.unresolved += len(event.block_hashes)  # no token ids (privacy mode) or malformed
            return []
        extras = _extras(event)
        if event.parent_block_hash is None:
            salt = event.cache_salt or (extras[0] if extras and extras[0] else "")
            root = namespace_seed(self._model_key(event), salt)
            state: _EngineBlock | None = _EngineBlock(root, root, (), ())
        else:
            state = self._blocks.get(event.parent_block_hash)
        new: list[int] = []  # gateway hashes newly held in ``tier``
        for i, engine_hash in enumerate(event.block_hashes):
            known = self._blocks.get(engine_hash)
            if known is not None:  # stored again: another tier (offload, load-back) or a repeat
                state = known
                if tier not in known.tiers:
                    known.tiers.add(tier)
                    new += self._hold(known.completed, tier)
                continue
            salted_root = i == 0 and event.parent_block_hash is None
            if state is None or extras[i] is None or (extras[i] and not salted_root):
                # unknown parent, or content beyond the tokens (an image, prompt embeddings), or a salt
                # where vLLM puts none: this block and the ones after it cannot be named by their tokens
                self.stats.unresolved += len(event.block_hashes) - i
                break
            state = self._extend(state, tokens[i * size : (i + 1) * size])
            state.tiers.add(tier)
            self._blocks[engine_hash] = state
            self.stats.stored += 1
            new += self._hold(state.completed, tier)
        if len(self._blocks) > self.max_blocks:
            self.stats.resets += 1
            self.reset()
            return [ClearedOp(self.worker_id)]
        return [StoredOp(self.worker_id, None, new, tier)] if new else []

    def _extend(self, parent: _EngineBlock, tokens: list[int]) -> _EngineBlock:
        pending = (*parent.tail, *tokens)
        full = len(pending) // self.block_size * self.block_size
        completed = tuple(block_hashes(pending[:full], self.block_size, seed=parent.root, parent=parent.last))
        last = completed[-1] if completed else parent.last
        return _EngineBlock(parent.root, last, tuple(pending[full:]), completed)

    def _hold(self, hashes: tuple[int, ...], tier: Tier) -> list[int]:
        newly = []
        for h in hashes:
            key = (h, tier)
            count = self._refs.get(key, 0)
            self._refs[key] = count + 1
            if count == 0:
                newly.append(h)
        return newly

    def _model_key(self, event: BlockStored) -> str:
        if event.lora_id is None and event.lora_name is None:
            return self.model_id
        return event.lora_name or f"{self.model_id}:lora:{event.lora_id}"

    # -- removed --------------------------------------------------------------------------------------
    def _removed(self, engine_hashes: list[int], tier: Tier) -> list[IndexOp]:
        gone: list[int] = []
        for engine_hash in engine_hashes:
            block = self._blocks.get(engine_hash)
            if block is None or tier not in block.tiers:
                continue
            block.tiers.discard(tier)
            if not block.tiers:
                del self._blocks[engine_hash]
            for h in block.completed:
                key = (h, tier)
                count = self._refs.get(key, 0) - 1
                if count > 0:
                    self._refs[key] = count
                else:
                    self._refs.pop(key, None)
                    gone.append(h)
        return [RemovedOp(self.worker_id, gone, tier)] if gone else []


def _extras(event: BlockStored) -> list[str | None]:
    """What each block's hash covers beyond its tokens, as vLLM's ``extra_keys`` tell it: "" nothing (or
    only the event's LoRA adapter, which ``lora_name`` names already), a string the request's cache salt
    (vLLM puts it in a chain's first block), None anything else: ``(mm identifier, offset)`` pairs of an
    image, prompt-embeds digests, a second string, any shape a later version adds. The token ids do not
    determine such a block's KV, so it is never named (two images behind the same placeholder tokens would
    otherwise share a name)."""
    per_block = event.extra_keys or [None] * len(event.block_hashes)
    return [_salt_of(keys, event.lora_name) for keys in per_block]


def _salt_of(keys: list[object] | None, lora_name: str | None) -> str | None:
    rest = list(keys or ())
    if lora_name is not None and rest[:1] == [lora_name]:
        rest = rest[1:]  # vLLM lists the adapter's name first in every block's keys
    if not rest:
        return ""
    salt = rest[0]
    return salt if len(rest) == 1 and isinstance(salt, str) and salt else None


class ForeignWorkerNames:
    """One worker's namers, one per DP rank (each rank is its own event stream and its own radix cache,
    whose engine hashes may coincide with another rank's for the same tokens), sharing the reference
    counts of the gateway blocks: the index holds a block for the worker while any rank holds it.

    Invariant: the namers are reset together, whenever the worker's index entries are purged
    (``ClearedOp`` is per worker, not per rank): ``ops`` does it when an event implies a purge (an
    ``AllBlocksCleared``, a namer over its bound), and callers that purge for their own reasons (a gap in
    a rank's stream) call ``reset``.
    """

    def __init__(self, worker_id: str, model_id: str, block_size: int, max_blocks: int = 4_000_000) -> None:
        self.worker_id = worker_id
        self._refs: dict[tuple[int, Tier], int] = {}
        self._make = lambda: ForeignBlockNamer(worker_id, model_id, block_size, max_blocks, self._refs)
        self._ranks: dict[int, ForeignBlockNamer] = {}

    def rank(self, rank: int) -> ForeignBlockNamer:
        if rank not in self._ranks:
            self._ranks[rank] = self._make()
        return self._ranks[rank]

    def ops(self, rank: int, event: KVEvent) -> list[IndexOp]:
        ops = self.rank(rank).ops(event)
        if any(isinstance(op, ClearedOp) for op in ops):
            self.reset()
        return ops

    def reset(self) -> None:
        for namer in self._ranks.values():
            namer.reset()
        self._refs.clear()
