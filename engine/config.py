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

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.max_batch_tokens < 1 or self.max_running < 1:
            raise ValueError("page_size, max_batch_tokens and max_running must be positive")
