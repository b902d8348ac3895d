"""Tokenizer: parity with transformers on the real SmolLM2 vocabulary, chat template, streaming decode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

from cache.prompt.tokenizer import Tokenizer
from engine.weights import WeightLoadError

TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; pi is 3.14159 and 1,000,000 > 999.",
    "   leading spaces, double  spaces,\ttabs\n\nblank lines\r\nand trailing   ",
    "héllo wörld — naïve café, Straße, İstanbul, ﬁ ligature",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🤗🚀👩‍👩‍👧 and accents ǅ",
    'def f(x: int) -> int:\n    """Square."""\n    return x ** 2  # comment\n\n\nclass A:\n\tpass\n',
    "I'm sure you're right, they'll say IT'S FINE, we've done it, I'd go.",
    "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
    "<|endoftext|>text right after<|im_end|><|im_start|>",
    '{"json": [1, 2, 3], "nested": {"k": null}}',
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer: Tokenizer) -> Tokenizer:
    return smollm2_tokenizer  # the session's (from the GGUF), loaded once


@pytest.fixture(scope="module")
def reference(smollm2_gguf_path: Path) -> Any:
    """transformers' own GGUF tokenizer conversion of the same file (offline, local path)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.slow
def test_encode_matches_transformers(tokenizer: Tokenizer, reference: Any, text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.slow
def test_numerals_are_split_one_per_token_like_llama_cpp(tokenizer: Tokenizer, reference: Any) -> None:
    """SmolLM2's pre-tokenizer ("smollm" in llama.cpp) isolates every \\p{N} character before the GPT-2 regex.

    transformers' GGUF conversion skips that step; for ASCII digits it makes no difference (the vocabulary
    has no multi-digit tokens) but for other numerals after a space it does, so compare against
    transformers with llama.cpp's split put back.
    """
    text = "x ²³ ١٢٣ Ⅻ ½ 12345"
    backend = Backend.from_str(reference.backend_tokenizer.to_str())  # a copy: the fixture is shared
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    assert tokenizer.encode(text) == backend.encode(text, add_special_tokens=False).ids
    assert tokenizer.encode("12345") == [tokenizer.token_to_id(d) for d in "12345"]


def test_special_tokens_and_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("<|im_start|>user<|im_end|>")[::2] == [1, 2]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_ids, tokenizer.vocab_size) == (1, (2,), 49152)
    assert tokenizer.encode("hi", add_special_tokens=True) == tokenizer.encode("hi")  # SmolLM2 adds no BOS
    ids = tokenizer.encode("<|im_start|>assistant\nHello<|im_end|>")
    assert tokenizer.decode(ids) == "assistant\nHello"


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Ünïcode 🤗?"},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.slow
def test_chat_template_matches_transformers(
    tokenizer: Tokenizer, reference: Any, messages: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    assert tokenizer.encode(ours) == reference.encode(theirs, add_special_tokens=False)


def test_chat_template_raise_exception_and_tojson() -> None:
    template = (
        "{% if messages|length == 0 %}{{ raise_exception('no messages') }}{% endif %}{{ messages|tojson }}"
    )
    tok = Tokenizer(Backend(models.BPE()), None, (), template)
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == '[{"role": "user", "content": "é"}]'
    with pytest.raises(Exception, match="no messages"):
        tok.apply_chat_template([])


def test_incremental_decode_equals_full_decode(tokenizer: Tokenizer) -> None:
    text = "Grüße 🤗🚀👩‍👩‍👧 日本語 — done<|im_end|>"
    ids = tokenizer.encode(text)
    # Emoji are split over several byte-level tokens, so some steps must hold text back.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    decoder = tokenizer.incremental_decoder()
    deltas = [decoder.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + decoder.flush() == tokenizer.decode(ids) == text.removesuffix("<|im_end|>")


def test_incremental_flush_emits_an_incomplete_tail(tokenizer: Tokenizer) -> None:
    partial = tokenizer.encode("ok 🤗")[:-1]  # the stream ends inside the emoji's bytes
    decoder = tokenizer.incremental_decoder()
    streamed = decoder.add_many(partial)
    assert streamed.startswith("ok") and "\ufffd" not in streamed
    tail = decoder.flush()
    assert "\ufffd" in tail and streamed + tail == tokenizer.decode(partial)
    assert decoder.flush() == ""


def test_from_dir_matches_gguf(tmp_path: Path, tokenizer: Tokenizer) -> None:
    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    config = {
        "chat_template": tokenizer.chat_template,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    from_dir = Tokenizer.from_checkpoint_path(tmp_path)
    assert (from_dir.bos_token_id, from_dir.eos_token_ids) == (1, (2, 0))
    for text in TEXTS:
        assert from_dir.encode(text) == tokenizer.encode(text)
    messages = CONVERSATIONS[1]
    assert from_dir.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)


def test_missing_tokenizer_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(WeightLoadError, match=r"no tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(WeightLoadError, match="not found"):
        Tokenizer.from_gguf(tmp_path / "absent.gguf")


def test_import_is_torch_free() -> None:
    code = (
        "import sys, cache.prompt.tokenizer, engine.weights, cache.prompt.gguf_meta, cache.prompt.gguf_vocab; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[3])
