"""The one exception type every checkpoint and tokenizer loader raises; torch-free so the gateway can catch it."""

from __future__ import annotations


class WeightLoadError(ValueError):
    """A checkpoint cannot be loaded: missing file, unsupported architecture or tensor type, bad metadata.

    The message names the file and says what to do; callers show it to the user as is.
    """
