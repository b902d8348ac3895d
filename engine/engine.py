"""The engine core: load a model, then schedule -> run -> postprocess, one step at a time.

``LLMEngine`` is synchronous and single-threaded; ``engine.async_engine.AsyncEngine`` runs it in a
background thread and streams results to asyncio callers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cache.api.sampling import SamplingParams
from cache.prompt.model_files import default_model_path
from cache.prompt.tokenizer import Tokenizer
from engine.config import EngineConfig
from engine.kv.page_pool import PagePool
from engine.kv.prefix_cache import BlockHasher, CacheListener, PrefixCache
from engine.model_runner import ModelRunner, allocate_kv, kv_bytes_per_token
from engine.models.cpu_linear import packing_available
from engine.models.llama import LlamaForCausalLM
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import FinishReason, Sequence
from engine.weights import load_checkpoint

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them CPU bf16 matmuls convert through fp32 and run slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}[name]  # fmt: skip
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def scheduler_config(config: EngineConfig) -> SchedulerConfig:
    # Every running sequence decodes one token per step, so no more than the step's token budget can
    # run at once: a small budget (say 32) caps concurrency rather than failing the scheduler's check.
    max_running = min(config.max_running, config.max_batch_tokens)
    return SchedulerConfig(config.page_size, config.max_batch_tokens, max_running)


@dataclass(frozen=True)
class EngineInfo:
    """Facts discovered while loading, kept apart from the config."""

    model_id: str
    model_path: str
    device: str
    dtype: str
    num_pages: int
    page_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        hasher: BlockHasher | None = None,
        namespace_hash: Callable[[str], int] | None = None,
        listener: CacheListener | None = None,
    ) -> None:
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        path = Path(config.model) if config.model else default_model_path()
        checkpoint = load_checkpoint(path)
        self.tokenizer = Tokenizer.from_source(checkpoint.tokenizer_source)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        model_cfg = checkpoint.config

        with torch.device("meta"):
            model = LlamaForCausalLM(model_cfg)
        model = model.to_empty(device="cpu").float()
        model.rotary.build()
        model.load_weights(checkpoint.tensors())
        self.model = model.to(device=device, dtype=dtype).eval()
        self.model.rotary.build()  # keep the rotary tables in fp32 on the device
        if config.cpu_packed_linears and packing_available(device, dtype):
            self.model.pack_for_cpu()

        if config.kv_cache_tokens is not None:
            kv_tokens = config.kv_cache_tokens
        else:
            kv_tokens = int(config.kv_cache_memory_gib * 2**30) // kv_bytes_per_token(self.model, dtype)
        num_pages = kv_tokens // config.page_size
        max_model_len = min(
            config.max_model_len or model_cfg.max_position_embeddings, num_pages * config.page_size
        )
        self.runner = ModelRunner(
            self.model, allocate_kv(self.model, num_pages, config.page_size, dtype), config.page_size
        )
        self.pool = PagePool(num_pages)
        self.cache = PrefixCache(self.pool, config.page_size, hasher, listener, namespace_hash)
        self.scheduler = Scheduler(scheduler_config(config), self.pool, self.cache)
        eos = tuple(sorted(set(model_cfg.eos_token_ids) | set(self.tokenizer.eos_token_ids)))
        self.info = EngineInfo(
            model_id=config.model_id or path.name.removesuffix(".gguf"),
            model_path=str(path),
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            num_pages=num_pages,
            page_size=config.page_size,
            max_model_len=max_model_len,
            eos_token_ids=eos,
        )
        log.info("engine ready: %s", self.info)

    def make_sequence(
        self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, cache_salt: str = ""
    ) -> Sequence:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.info.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.info.max_model_len} tokens"
            )
        if any(t < 0 or t >= self.model.config.vocab_size for t in prompt_ids):
            raise ValueError(f"token ids must be in [0, {self.model.config.vocab_size})")
        return Sequence(
            request_id,
            list(prompt_ids),
            sampling,
            frozenset(self.info.eos_token_ids),
            self.info.max_model_len,
            cache_salt=cache_salt,
        )

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def abort(self, seq: Sequence) -> None:
        self.scheduler.finish(seq, FinishReason.ABORT)
        self.runner.sampler.forget(seq.request_id)

    def step(self) -> list[Sequence]:
        """One forward pass. Returns the sequences that gained a token (finished ones included)."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        tokens = self.runner.run(batch)
        updated = self.scheduler.postprocess(batch, tokens)
        for seq in updated:
            if seq.finished:
                self.runner.sampler.forget(seq.request_id)
        return updated

    def flush_cache(self) -> bool:
        """Drop all cached prefixes; refused (False) while requests are running."""
        if self.scheduler.has_work():
            return False
        self.cache.reset()
        return True
