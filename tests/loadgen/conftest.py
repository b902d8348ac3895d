"""Fixtures for loadgen tests: the real SmolLM2 tokenizer (torch-free) and its word vocabulary."""

from __future__ import annotations

from pathlib import Path

import pytest

from cache.prompt.tokenizer import Tokenizer
from loadgen.cli import load_tokenizer
from loadgen.workloads import WordVocabulary


@pytest.fixture(scope="session")
def tokenizer(smollm2_gguf_path: Path) -> Tokenizer:
    """Through the CLI's memo, so CLI tests don't parse the GGUF vocabulary again."""
    assert smollm2_gguf_path.is_file()
    return load_tokenizer(None)


@pytest.fixture(scope="session")
def vocab(tokenizer: Tokenizer) -> WordVocabulary:
    return WordVocabulary.from_tokenizer(tokenizer)
