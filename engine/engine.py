"""The engine core: schedule -> run -> postprocess, one step at a time, around a loaded model.

``LLMEngine`` is synchronous and single-threaded; ``engine.async_engine.AsyncEngine`` runs it in a
background thread and streams results to asyncio callers. Loading the model is ``engine.loader``'s
job, so several engines can share one ``LoadedModel`` (each with its own KV pool and prefix cache).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from cache.api.kv_fields import KVPin
from cache.api.requests import ServingLimits
from cache.api.sampling import SamplingParams
from cache.planning.load_profile import LoadProfile
from cache.wire.hashing import block_hashes, namespace_seed
from cache.wire.tiers import MEDIUM_DISK, MEDIUM_HOST
from engine.config import EngineConfig
from engine.kv.disk_store import DiskStore
from engine.kv.load_cost import LoadCost
from engine.kv.lower_tiers import LowerTiers
from engine.kv.page_pool import PagePool
from engine.kv.prefix_cache import BlockHasher, CacheListener, PrefixCache
from engine.kv.retention import RetentionPins
from engine.kv.transfer import KVTransfer, allocate_host_kv
from engine.loader import LoadedModel, load_model
from engine.model_runner import ModelRunner, allocate_kv, kv_bytes_per_token
from engine.models.attention import KVCache
from engine.sampling import Sampled
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import FinishReason, Sequence
from engine.step_times import StepTimes

log = logging.getLogger(__name__)


def scheduler_config(config: EngineConfig) -> SchedulerConfig:
    # Every running sequence decodes one token per step, so no more than the step's token budget can
    # run at once: a small budget (say 32) caps concurrency rather than failing the scheduler's check.
    max_running = min(config.max_running, config.max_batch_tokens)
    return SchedulerConfig(config.page_size, config.max_batch_tokens, max_running)


@dataclass(frozen=True)
class EngineInfo:
    """Everything a server needs to know about a running engine; facts found while loading, not config."""

    model_id: str
    model_path: str
    architecture: str  # "llama" | "qwen2"
    device: str
    dtype: str
    vocab_size: int
    num_pages: int
    page_size: int
    max_model_len: int
    max_running: int
    max_batch_tokens: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @property
    def limits(self) -> ServingLimits:
        """What requests must respect to be served (checked by ``cache.api.requests.parse_request``)."""
        return ServingLimits(self.vocab_size, self.max_model_len, engine_features=True)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, published by the thread that steps it (read from any thread)."""

    num_running: int = 0
    num_waiting: int = 0
    tokens_held: int = 0  # KV tokens in pages held by requests (and by retention pins: not evictable)
    pages_used: int = 0
    pages_free: int = 0
    pages_cached: int = 0  # owned by the prefix cache
    pages_total: int = 0
    # retention pins (``kv_pin``): distinct cached pages they hold, pins held, pins refused since start
    pages_pinned: int = 0
    num_pins: int = 0
    pins_refused: int = 0
    # KV tiers (all 0 without the hierarchical cache)
    host_pages_cached: int = 0
    host_pages_total: int = 0
    disk_pages_cached: int = 0
    disk_pages_total: int = 0
    tokens_loaded_from_host: int = 0  # prompt tokens loaded back instead of recomputed, since start
    tokens_loaded_from_disk: int = 0
    load_profile: LoadProfile = field(default_factory=LoadProfile)  # measured speed, for P:D advice
    # --itl-slo-ms: the token budget of a step that carries the running decodes (the static cap without
    # an SLO) and the step time line it comes from, t = fixed + per_token * tokens (0 until fitted)
    step_token_budget: int = 0
    step_time_fixed_s: float = 0.0
    step_time_per_token_s: float = 0.0


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel | None = None,
        hasher: BlockHasher | None = None,
        namespace_hash: Callable[[str], int] | None = None,
        listener: CacheListener | None = None,
    ) -> None:
        """``loaded``: a model loaded by ``engine.loader.load_model`` (loaded from ``config`` if None)."""
        self.config = config
        loaded = loaded or load_model(config)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        if config.kv_cache_tokens is not None:
            kv_tokens = config.kv_cache_tokens
        else:
            kv_tokens = int(config.kv_cache_memory_gib * 2**30) // kv_bytes_per_token(
                self.model, loaded.dtype
            )
        num_pages = kv_tokens // config.page_size
        model_cfg = self.model.config
        max_model_len = min(
            config.max_model_len or model_cfg.max_position_embeddings, num_pages * config.page_size
        )
        kv = allocate_kv(self.model, num_pages, config.page_size, loaded.dtype)
        self.runner = ModelRunner(self.model, kv, config.page_size)
        self.pool = PagePool(num_pages)
        sched = scheduler_config(config)
        # Every step's time, observed once: the --itl-slo-ms budget, the prefill rate load-back weighs,
        # and the speed GET /load_profile publishes for the gateway.
        self.step_time = StepTimes(
            sched.max_batch_tokens, min_prefill_tokens=config.page_size, max_batch=sched.max_running
        )
        self.lower: LowerTiers | None = None
        if config.enable_hierarchical_cache:
            if hasher is None:  # page files are named by block hash: name them as the server would
                hasher = _default_hasher(loaded.model_id, config.page_size)
                namespace_hash = namespace_hash or (lambda salt: namespace_seed(loaded.model_id, salt))
            bytes_per_token = kv_bytes_per_token(self.model, loaded.dtype)
            self.lower = _lower_tiers(config, kv, num_pages, bytes_per_token, self.step_time)
        self.cache = PrefixCache(self.pool, config.page_size, hasher, listener, namespace_hash, self.lower)
        self.pins = RetentionPins(
            self.cache,
            int(num_pages * config.kv_pin_fraction),
            int(num_pages * config.kv_pin_namespace_fraction),
        )
        if self.lower is not None and self.lower.disk is not None:
            restored = self.lower.restore_from_disk()
            log.info("KV disk tier %s: %d pages restored", config.hicache_disk_dir, restored)
        limit = self._step_token_limit if config.itl_slo_ms is not None else None
        self.scheduler = Scheduler(sched, self.pool, self.cache, step_token_limit=limit)
        self.info = EngineInfo(
            model_id=loaded.model_id,
            model_path=str(loaded.path),
            architecture=model_cfg.architecture,
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
            vocab_size=model_cfg.vocab_size,
            num_pages=num_pages,
            page_size=config.page_size,
            max_model_len=max_model_len,
            max_running=sched.max_running,
            max_batch_tokens=config.max_batch_tokens,
            eos_token_ids=loaded.eos_token_ids,
            bos_token_id=self.tokenizer.bos_token_id,
        )
        log.info("engine ready: %s", self.info)

    def make_sequence(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        cache_salt: str = "",
        kv_pins: tuple[KVPin, ...] = (),
    ) -> Sequence:
        """A request as the scheduler sees it. The prompt must respect ``info.limits`` (callers check
        it once, with ``cache.api.requests``): non-empty, shorter than the context, ids in the vocabulary.
        ``kv_pins``: prefixes of the prompt the retention pins hold once it is prefilled.

        With ``sampling.n > 1`` the returned sequence is choice 0 and carries the other choices in
        ``forks`` (choice i seeded with ``seed + i``); add only it: they start from its prefill."""
        seqs = [
            Sequence(
                request_id,
                list(prompt_ids),
                replace(sampling, seed=sampling.seed + i) if i and sampling.seed is not None else sampling,
                frozenset(self.info.eos_token_ids),
                self.info.max_model_len,
                cache_salt=cache_salt,
                choice=i,
            )
            for i in range(sampling.n)
        ]
        seqs[0].forks, seqs[0].kv_pins = seqs[1:], kv_pins
        return seqs[0]

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def abort(self, seq: Sequence) -> None:
        """End ``seq`` and the choices still waiting for its prefill."""
        for s in [seq, *seq.forks]:
            self.scheduler.finish(s, FinishReason.ABORT)
            self.runner.sampler.forget(s)
        seq.forks = []

    def step(self) -> list[Sequence]:
        """One forward pass. Returns the sequences that gained a token (finished ones included, and
        forks that started this step) and those that failed (finish reason ERROR, ``seq.error`` says why).

        Failures stay with their requests: a row whose sampling raises fails that sequence alone; a
        forward pass that raises fails this batch's sequences, each on its own (waiting ones are not
        touched). Either way the engine is consistent and the next step serves everyone else."""
        self.pins.expire()  # before scheduling: its evictions may take what expired
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        results: dict[Sequence, Sampled | Exception]
        try:
            start = time.perf_counter()
            results = self.runner.run(batch)
            seconds = time.perf_counter() - start
            self.step_time.observe(batch.num_tokens, seconds, batch.num_decodes)
        except Exception as exc:
            log.exception("forward pass failed; failing the %d requests in this batch", len(batch.chunks))
            results = {chunk.seq: exc for chunk in batch.chunks}
        failed = [seq for seq, result in results.items() if isinstance(result, Exception)]
        for seq in failed:
            self._fail(seq, results[seq])  # type: ignore[arg-type]
        tokens = {}
        for seq, result in results.items():
            if isinstance(result, Sampled):
                tokens[seq] = result.token
                seq.last_logprobs = result.logprobs
        parents = [c.seq for c in batch.chunks if c.samples and c.seq.forks]  # before postprocess moves on
        updated = self.scheduler.postprocess(batch, tokens)
        for seq in updated:
            if seq.kv_pins and len(seq.output_ids) == 1:  # just prefilled: its prompt's pages are cached
                self._retain(seq)
        stepped = updated + self._start_forks(parents, tokens) + failed
        for seq in stepped:
            if seq.finished:
                self.runner.sampler.forget(seq)
        return stepped

    def _retain(self, seq: Sequence) -> None:
        for pin in seq.kv_pins:
            prefix = seq.prompt_ids if pin.tokens is None else seq.prompt_ids[: pin.tokens]
            self.pins.pin(prefix, seq.cache_salt, pin.ttl_s)

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        log.warning("request %s failed in the engine: %r", seq.request_id, exc)
        seq.error = f"the engine failed while running this request: {exc}"
        self.scheduler.finish(seq, FinishReason.ERROR)

    def _start_forks(self, parents: list[Sequence], tokens: dict[Sequence, int]) -> list[Sequence]:
        """The other choices of requests whose prompt was sampled this step: each starts from the
        token it drew from those logits (``Scheduler.fork``), or fails with its parent's forward."""
        started: list[Sequence] = []
        for parent in parents:
            waiting = [f for f in parent.forks if not f.finished]
            parent.forks = []
            for child in waiting:
                if child not in tokens and not child.finished:  # the forward failed: no first token
                    self._fail(child, RuntimeError(parent.error or "the forward pass failed"))
            children = [(f, tokens[f]) for f in waiting if f in tokens and not f.finished]
            self.runner.copy_pages(self.scheduler.fork(parent, children))
            started.extend(waiting)
        return started

    def stats(self) -> EngineStats:
        """Current load; call it on the thread that steps the engine."""
        sched, pool, lower = self.scheduler, self.pool, self.lower
        fit = self.step_time.fit
        tiers = {}
        profile = self.step_time.load_profile()
        if lower is not None:
            profile = replace(profile, kv_load=lower.load_cost())  # what a lower-tier hit saves here
            tiers = dict(
                host_pages_cached=lower.host_pool.num_used,
                host_pages_total=lower.host_pool.num_pages,
                disk_pages_cached=lower.disk.num_pages if lower.disk else 0,
                disk_pages_total=lower.disk.capacity_pages if lower.disk else 0,
                tokens_loaded_from_host=lower.loaded_tokens[MEDIUM_HOST],
                tokens_loaded_from_disk=lower.loaded_tokens[MEDIUM_DISK],
            )
        return EngineStats(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            tokens_held=sched.pages_held_by_requests * self.info.page_size,
            pages_used=pool.num_used,
            pages_free=pool.num_free,
            pages_cached=self.cache.num_pages,
            pages_total=pool.num_pages,
            pages_pinned=self.pins.pinned_pages,
            num_pins=len(self.pins),
            pins_refused=self.pins.refused,
            load_profile=profile,
            step_token_budget=self._step_token_budget(),
            step_time_fixed_s=fit.fixed_s if fit else 0.0,
            step_time_per_token_s=fit.per_token_s if fit else 0.0,
            **tiers,
        )

    def _step_token_limit(self, decodes: int) -> int:
        assert self.config.itl_slo_ms is not None
        return self.step_time.budget(self.config.itl_slo_ms / 1e3, decodes)

    def _step_token_budget(self) -> int:
        """What a step with the running decodes may hold now (the static cap without an SLO)."""
        decodes = sum(1 for s in self.scheduler.running if not s.in_prefill)
        if self.config.itl_slo_ms is None or not decodes:
            return self.info.max_batch_tokens
        return self._step_token_limit(decodes)

    def flush_cache(self) -> bool:
        """Drop all cached prefixes; refused (False) while requests are running."""
        if self.scheduler.has_work():
            return False
        self.pins.release_all()
        self.cache.reset()
        return True


def _default_hasher(model_id: str, page_size: int) -> BlockHasher:
    seed = namespace_seed(model_id)
    return lambda parent, token_ids: block_hashes(token_ids, page_size, seed=seed, parent=parent)


def _lower_tiers(
    config: EngineConfig, device_kv: KVCache, num_pages: int, bytes_per_token: int, step_times: StepTimes
) -> LowerTiers:
    """The host pool (``hicache_size_gib``, else ``hicache_ratio`` x the device pool) and the disk tier,
    whose load-backs weigh a copy against the prefill rate ``step_times`` measures."""
    page_bytes = bytes_per_token * config.page_size
    if config.hicache_size_gib > 0:
        host_pages = int(config.hicache_size_gib * 2**30) // page_bytes
    else:
        host_pages = int(num_pages * config.hicache_ratio)
    mover = KVTransfer(device_kv, allocate_host_kv(device_kv, host_pages, config.page_size), config.page_size)
    disk = None
    if config.hicache_disk_dir is not None:
        capacity = int(config.hicache_disk_size_gib * 2**30) // page_bytes
        disk = DiskStore(config.hicache_disk_dir, capacity, mover.layout, mover.page_bytes)
    cost = LoadCost(config.hicache_min_load_tokens, lambda: step_times.prefill_tokens_per_s)
    log.info(
        "KV tiers: %d host pages, %s disk pages, %s",
        host_pages,
        disk and disk.capacity_pages,
        config.hicache_write_policy,
    )
    return LowerTiers(PagePool(host_pages), mover, config.hicache_write_policy, cost, disk)
