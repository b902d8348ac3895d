"""Engine configuration, built once at the edge (CLI or caller) and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TIERS = "tiers"  # the argument group of the KV-tier flags


def _flag(default: Any, help: str, **more: Any) -> Any:
    return field(default=default, metadata={"help": help, **more})


@dataclass(frozen=True)
class EngineConfig:
    """Fields with ``help`` are ``prefixgate engine`` flags (``cache.api.flags``), named as the field."""

    model: str | None = _flag(
        None, ".gguf file or Hugging Face directory (default: bundled SmolLM2-135M-Instruct)"
    )
    device: str = _flag("auto", "auto (cuda when present, else cpu) | cpu | cuda | cuda:N")
    dtype: str = _flag(
        "auto", "auto (bf16 where the device computes it natively, else fp32) | float32 | bfloat16 | float16"
    )
    page_size: int = _flag(16, "tokens per KV page (and per hashed block)")
    max_batch_tokens: int = _flag(512, "per-step token budget: decodes + prefill chunks")
    max_running: int = _flag(64, "concurrently running sequences")
    itl_slo_ms: float | None = _flag(
        None,
        "inter-token latency target: steps that carry decodes hold only as many tokens as the step time "
        "learned online allows within it (--max-batch-tokens stays the cap); default: the static budget",
    )
    kv_cache_tokens: int | None = _flag(
        None, "KV pool capacity in tokens (default: from --kv-cache-memory-gib)"
    )
    kv_cache_memory_gib: float = _flag(1.0, "KV pool size when --kv-cache-tokens is not given")
    max_model_len: int | None = _flag(None, "context length cap (default: the model's)")
    model_id: str | None = _flag(None, "name served over the API (default: from the file name)")
    threads: int | None = _flag(None, "torch CPU threads (default: torch's)")
    fused_decode: bool = _flag(
        True,
        "on CPU, run every layer of a pure decode step in one C++ call (compiled at the first load, ~45 s, "
        "then cached; the Python path's arithmetic, ~1.5x faster at batch 1); off: layer by layer",
        flag="--no-fused-decode",
    )
    cpu_packed_linears: bool = True  # oneDNN pre-packed weights for fp32 on CPU (2-3x faster decode)
    # Matmul weights: "float" (dequantized, in dtype), "int8" (per row) or "int4" (groups of 32; a Q4
    # GGUF's own blocks), weight-only, CPU only, for small decode batches; "auto" = int4 on CPUs with
    # PyTorch's kernels when dtype is bf16, else float. Float is the default: the quantized modes serve
    # decode steps from the 4-bit weights and larger steps from dense copies, so a prompt whose prefix
    # is cached (its first step is small) can round differently from the same prompt computed cold,
    # and in bf16 that flips greedy near-ties. Opt in for batch-1 decode speed (docs/benchmarks.md).
    weights: str = _flag(
        "float",
        "matmul weights: float | int8 | int4 | auto (int4 on CPU with bf16, else float); the quantized "
        "modes decode about 2x faster at batch 1 but cached and cold prompts may round differently",
    )
    quantized_max_rows: int | None = _flag(
        None,
        "with quantized --weights: steps of up to this many rows use the quantized kernels, larger ones "
        "the dense copies (default: measured on this machine while loading, logged)",
    )
    # Retention pins (engine/kv/retention.py): prefixes a request's ``kv_pin`` holds in the device pool.
    kv_pin_fraction: float = _flag(
        0.5,
        "retention pins (a request's kv_pin, set by the gateway) may hold at most this fraction of the "
        "KV pool; 0 turns pinning off",
    )
    kv_pin_namespace_fraction: float = _flag(
        0.125,
        "at most this fraction of the KV pool for one namespace's (tenant's) pins; its oldest are released "
        "to make room for its new ones",
    )
    # KV tiers (SGLang HiCache's flags): a host pool under the device pool, and an optional disk tier.
    enable_hierarchical_cache: bool = _flag(
        False,
        "keep prefixes evicted from the device pool in host memory (and on disk, with --hicache-disk-dir);"
        " off: one pool, evicted prefixes are recomputed",
        group=TIERS,
    )
    hicache_ratio: float = _flag(2.0, "host pool size as a multiple of the device pool", group=TIERS)
    hicache_size_gib: float = _flag(
        0.0,
        "host pool size in GiB; overrides --hicache-ratio when > 0",
        group=TIERS,
        flag="--hicache-size",
        metavar="GIB",
    )
    hicache_write_policy: str = _flag(
        "write_through",
        "when a device page gets its host copy: at insert (write_through), at its second hit "
        "(write_through_selective) or at eviction (write_back)",
        group=TIERS,
    )
    hicache_disk_dir: str | None = _flag(
        None,
        "disk tier: checksummed page files that a restarted engine serves from",
        group=TIERS,
        metavar="DIR",
    )
    hicache_disk_size_gib: float = _flag(
        8.0, "disk tier capacity in GiB", group=TIERS, flag="--hicache-disk-size", metavar="GIB"
    )
    hicache_min_load_tokens: int = _flag(
        64, "shorter lower-tier prefixes are recomputed, never loaded back", group=TIERS
    )

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.max_batch_tokens < 1 or self.max_running < 1:
            raise ValueError("page_size, max_batch_tokens and max_running must be positive")
        if self.itl_slo_ms is not None and not (0 < self.itl_slo_ms < float("inf")):  # NaN fails too
            raise ValueError("itl_slo_ms must be a positive number of milliseconds")
        if self.quantized_max_rows is not None and self.quantized_max_rows < 0:
            raise ValueError("quantized_max_rows must be 0 or more")
        if not (0 <= self.kv_pin_fraction < 1 and 0 <= self.kv_pin_namespace_fraction < 1):
            raise ValueError("kv_pin_fraction and kv_pin_namespace_fraction must be in [0, 1)")
        if self.hicache_write_policy not in WRITE_POLICIES:
            raise ValueError(f"hicache_write_policy must be one of {', '.join(WRITE_POLICIES)}")
        if self.hicache_disk_dir is not None and not self.enable_hierarchical_cache:
            raise ValueError(
                "a hicache disk directory needs the hierarchical cache (enable_hierarchical_cache)"
            )
        if self.enable_hierarchical_cache and self.hicache_ratio <= 0 and self.hicache_size_gib <= 0:
            raise ValueError("the host pool needs hicache_ratio > 0 or hicache_size_gib > 0")


WRITE_POLICIES = ("write_through", "write_through_selective", "write_back")
