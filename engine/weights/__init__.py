"""Checkpoint loading: a GGUF file or a Hugging Face safetensors directory -> config + HF-named tensors.

The torch-side readers (``gguf.py``, ``safetensors.py``) are imported when a checkpoint is actually
loaded; the torch-free parts every layer shares (GGUF metadata, the tokenizer, the default model's
location) live in ``cache.prompt``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cache.prompt.gguf_meta import GGUFFile
from cache.prompt.model_files import WeightLoadError

if TYPE_CHECKING:
    import torch

    from engine.models.config import ModelConfig
    from engine.weights.quant import GroupQuant4

__all__ = [
    "Checkpoint",
    "TokenizerSource",
    "WeightLoadError",
    "load_checkpoint",
]

# What ``cache.prompt.tokenizer.Tokenizer.from_source`` accepts: an already-parsed GGUF file (so its
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
    read_group_quantized: Callable[[], Iterator[tuple[str, GroupQuant4]]] | None = None

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.read_tensors()

    def group_quantized(self) -> Iterator[tuple[str, GroupQuant4]]:
        """The tensors the file stores in 4-bit groups (GGUF Q4_0/Q4_1), as stored: HF names, no
        dequantization. Weight-only int4 serving uses them as they are instead of re-quantizing."""
        return iter(()) if self.read_group_quantized is None else self.read_group_quantized()


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
