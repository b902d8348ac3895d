"""Continuous batching with chunked prefill under a per-step token budget (Sarathi-Serve).

Each step is filled in a fixed order: every running decode first (one token each, so decodes never
stall behind a long prompt), then the next chunk of prefills already in progress, then new
requests, each chunked to fit what is left of the budget. Pure Python: no tensors, no device.

Memory: a sequence holds pages for the tokens it has computed. When the pool runs dry the prefix
cache evicts unlocked pages (demoting them to host memory when the cache has lower tiers); if that
is not enough, the newest running sequence is preempted (its computed pages go to the prefix cache,
so its recompute is mostly a cache hit).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from engine.kv.page_pool import PagePool
from engine.kv.prefix_cache import PrefixCache
from engine.sequence import FinishReason, Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    page_size: int = 16
    max_batch_tokens: int = 512  # the per-step token budget (prefill chunk + decodes)
    max_running: int = 64


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first token computed this step (== seq.num_computed when scheduled)
    length: int  # tokens computed this step

    @property
    def samples(self) -> bool:
        """The step reaches the sequence's last token, so its logits give the next token."""
        return self.start + self.length == self.seq.num_tokens


@dataclass
class Batch:
    chunks: list[ScheduledChunk]

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)

    @property
    def num_decodes(self) -> int:
        """Rows that decode (one output token's KV each); the other tokens are prompt prefill."""
        return sum(1 for c in self.chunks if c.length == 1 and c.start >= len(c.seq.prompt_ids))


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        pool: PagePool,
        cache: PrefixCache,
        step_token_limit: Callable[[int], int] | None = None,
    ) -> None:
        """``step_token_limit(decodes)``: the tokens a step carrying that many decodes may hold, below
        the static budget (``--itl-slo-ms``: ``engine.step_times``); it must exceed ``decodes``, or
        prompts stall while others decode. Steps without decodes get the whole static budget: no
        one's inter-token latency waits on them."""
        assert config.max_batch_tokens >= config.max_running, "every running decode must fit in a step"
        self.config = config
        self.step_token_limit = step_token_limit
        self.pool = pool
        self.cache = cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def pages_held_by_requests(self) -> int:
        """Pages that running requests pin: locked tree pages plus their private pages."""
        return self.pool.num_used - self.cache.evictable_pages

    # -- the step ----------------------------------------------------------------------------------
    def schedule(self) -> Batch | None:
        budget = self.config.max_batch_tokens
        chunks: list[ScheduledChunk] = []
        i = 0
        while i < len(self.running) and budget > 0:  # 1. decodes
            seq = self.running[i]
            if seq.in_prefill:
                i += 1
                continue
            if not self._grow(seq, seq.num_tokens):
                if self.running[-1] is seq:  # nothing newer to preempt: this one waits
                    self._preempt(seq)
                    continue
                self._preempt(self.running[-1])
                continue
            chunks.append(ScheduledChunk(seq, seq.num_computed, 1))
            budget -= 1
            i += 1
        if chunks and self.step_token_limit is not None:  # decodes ride this step: bound its time
            budget = max(0, min(budget, self.step_token_limit(len(chunks)) - len(chunks)))
        for seq in self.running:  # 2. prefills in progress
            if budget == 0:
                break
            if seq.in_prefill and (n := self._fit(seq, budget)) > 0:
                chunks.append(ScheduledChunk(seq, seq.num_computed, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:  # 3. new
            seq = self.waiting[0]
            self._admit(seq)
            n = self._fit(seq, budget)
            if n == 0:
                self._release(seq)
                break
            self.waiting.popleft()
            if not seq.admitted:  # a preempted sequence's recompute is not a cache hit for the user
                seq.admitted, seq.num_cached_prompt = True, min(seq.num_computed, len(seq.prompt_ids))
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
        return Batch(chunks) if chunks else None

    def postprocess(self, batch: Batch, next_tokens: dict[Sequence, int]) -> list[Sequence]:
        """Record the step's progress and sampled tokens; returns the sequences that gained a token."""
        updated = []
        for chunk in batch.chunks:
            seq = chunk.seq
            if seq.finished:
                continue
            seq.num_computed = chunk.start + chunk.length
            if chunk.samples:
                token = next_tokens[seq]
                seq.output_ids.append(token)
                updated.append(seq)
                reason = self._finish_reason(seq, token)
                if reason is not None:
                    self.finish(seq, reason)
                    continue
            self._cache_full_pages(seq)
        return updated

    def fork(self, parent: Sequence, children: list[tuple[Sequence, int]]) -> list[tuple[int, int]]:
        """Start the other choices of ``parent``'s request (n > 1), each from its first token, which
        was sampled from the logits of ``parent``'s prompt this step (call after ``postprocess``).

        The prompt is prefilled once: a child shares its whole pages through the prefix cache (a
        locked path, as any cache hit) and gets a private copy of the partly filled last page, so it
        decodes next step. Returns the (parent page, child page) copies for the runner to make.
        When there is no running slot or page for it (or ``parent`` already ended), a child waits
        at the head of the queue instead and, when admitted, recomputes only that last page."""
        ps, prompt_len = self.config.page_size, len(parent.prompt_ids)
        full, partial = divmod(prompt_len, ps)
        copies: list[tuple[int, int]] = []
        queued: list[Sequence] = []
        for child, token in children:
            child.output_ids.append(token)
            child.admitted, child.num_cached_prompt = True, parent.num_cached_prompt
            reason = self._finish_reason(child, token)
            if reason is not None:
                child.status, child.finish_reason = Status.FINISHED, reason
                continue
            shares = (
                parent.status is Status.RUNNING
                and parent.num_computed == prompt_len
                and len(self.running) < self.config.max_running
            )
            if not shares or (partial and not self._reserve(1)):
                queued.append(child)
                continue
            assert parent.num_tree_pages == full, "postprocess gives the tree a running prompt's whole pages"
            child.pages = parent.pages[:full]
            if partial:
                child.pages.append(self.pool.alloc(1)[0])
                copies.append((parent.pages[full], child.pages[-1]))
            child.cache_node, child.num_tree_pages = parent.cache_node, parent.num_tree_pages
            if child.cache_node is not None:
                self.cache.lock(child.cache_node)
            child.num_computed, child.status = prompt_len, Status.RUNNING
            self.running.append(child)
        self.waiting.extendleft(reversed(queued))
        return copies

    def _reserve(self, num_pages: int) -> bool:
        """At least ``num_pages`` free pages, evicting cached ones if needed."""
        if self.pool.num_free < num_pages:
            self.cache.evict(num_pages - self.pool.num_free)
        return self.pool.num_free >= num_pages

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence (stop, length or abort) and give back everything it holds."""
        if seq.finished:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    # -- helpers -----------------------------------------------------------------------------------
    @staticmethod
    def _finish_reason(seq: Sequence, token: int) -> FinishReason | None:
        p = seq.sampling
        if (not p.ignore_eos and token in seq.eos_token_ids) or token in p.stop_token_ids:
            return FinishReason.STOP
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= seq.max_total_tokens:
            return FinishReason.LENGTH
        return None

    def _admit(self, seq: Sequence) -> None:
        # Always leave at least one token to compute: its logits give the first output token.
        # With lower tiers, a prefix held there is loaded back first when that pays.
        pages, node = self.cache.match_and_load(seq.token_ids[: seq.num_tokens - 1], seq.cache_salt)
        self.cache.lock(node)
        seq.pages, seq.cache_node, seq.num_tree_pages = list(pages), node, len(pages)
        seq.num_computed = len(pages) * self.config.page_size

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give ``seq`` pages for its first ``num_tokens`` tokens, evicting cached pages if needed."""
        need = -(-num_tokens // self.config.page_size) - len(seq.pages)
        if need <= 0:
            return True
        if not self._reserve(need):
            return False
        seq.pages.extend(self.pool.alloc(need))
        return True

    def _fit(self, seq: Sequence, budget: int) -> int:
        """Largest chunk of ``seq``'s remaining tokens that fits the budget and obtainable pages."""
        want = min(seq.num_tokens - seq.num_computed, budget)
        if self._grow(seq, seq.num_computed + want):
            return want
        self._grow(seq, seq.num_computed + self.pool.num_free * self.config.page_size)
        return max(0, min(want, len(seq.pages) * self.config.page_size - seq.num_computed))

    def _cache_full_pages(self, seq: Sequence) -> None:
        """Hand computed whole pages to the prefix cache so that other requests can share them."""
        full = seq.num_computed // self.config.page_size
        if full <= seq.num_tree_pages:
            return
        ps = self.config.page_size
        tree_pages, node = self.cache.insert(seq.token_ids[: full * ps], seq.pages[:full], seq.cache_salt)
        seq.pages[:full] = tree_pages
        self.cache.lock(node)
        if seq.cache_node is not None:
            self.cache.unlock(seq.cache_node)
        seq.cache_node, seq.num_tree_pages = node, full

    def _release(self, seq: Sequence) -> None:
        self._cache_full_pages(seq)
        self.pool.free(seq.pages[seq.num_tree_pages :])
        if seq.cache_node is not None:
            self.cache.unlock(seq.cache_node)
        seq.pages, seq.cache_node, seq.num_tree_pages, seq.num_computed = [], None, 0, 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
