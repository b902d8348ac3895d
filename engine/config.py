"""Engine configuration, built once at the edge (CLI or caller) and passed down."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # .gguf file or Hugging Face directory; None = bundled SmolLM2-135M-Instruct
    device: str = "auto"  # "auto" = cuda when present, else cpu
    dtype: str = "auto"  # "auto" = bf16 where the device computes it natively, else fp32
    page_size: int = 16  # tokens per KV page (and per hashed block)
    max_batch_tokens: int = 512  # per-step token budget: decodes + prefill chunks
    max_running: int = 64  # concurrently running sequences
    kv_cache_tokens: int | None = None  # KV pool capacity; None = from kv_cache_memory_gib
    kv_cache_memory_gib: float = 1.0
    max_model_len: int | None = None  # None = the model's context length
    model_id: str | None = None  # the name served over the API; None = derived from the file name
    threads: int | None = None  # CPU threads for torch; None = torch's default
    cpu_packed_linears: bool = True  # oneDNN pre-packed weights for fp32 on CPU (2-3x faster decode)
    # Matmul weights: "float" (dequantized, in dtype), "int8" (per row) or "int4" (groups of 32; a Q4
    # GGUF's own blocks), weight-only, CPU only, for small decode batches; "auto" = int4 on CPUs with
    # PyTorch's kernels when dtype is bf16 (with fp32 activations the kernels are slower), else float.
    weights: str = "auto"
    # KV tiers (SGLang HiCache's flags): a host pool under the device pool, and an optional disk tier.
    enable_hierarchical_cache: bool = False  # off: one pool, evicted prefixes are recomputed (as before)
    hicache_ratio: float = 2.0  # host pool size as a multiple of the device pool
    hicache_size_gib: float = 0.0  # host pool size in GiB; 0 = from hicache_ratio
    hicache_write_policy: str = "write_through"  # or write_through_selective (2nd hit), write_back
    hicache_disk_dir: str | None = None  # directory of page files that survives a restart; None = no disk
    hicache_disk_size_gib: float = 8.0
    hicache_min_load_tokens: int = 64  # shorter lower-tier prefixes are recomputed, never loaded back

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.max_batch_tokens < 1 or self.max_running < 1:
            raise ValueError("page_size, max_batch_tokens and max_running must be positive")
        if self.hicache_write_policy not in WRITE_POLICIES:
            raise ValueError(f"hicache_write_policy must be one of {', '.join(WRITE_POLICIES)}")
        if self.hicache_disk_dir is not None and not self.enable_hierarchical_cache:
            raise ValueError(
                "a hicache disk directory needs the hierarchical cache (enable_hierarchical_cache)"
            )
        if self.enable_hierarchical_cache and self.hicache_ratio <= 0 and self.hicache_size_gib <= 0:
            raise ValueError("the host pool needs hicache_ratio > 0 or hicache_size_gib > 0")


WRITE_POLICIES = ("write_through", "write_through_selective", "write_back")
