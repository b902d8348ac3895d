"""GGUF tokenizer metadata (llama.cpp's vocabulary arrays) -> a ``tokenizers`` Tokenizer. Torch-free.

llama.cpp stores the vocabulary, merges and token types but not the pre-tokenizer itself, only its
name (``tokenizer.ggml.pre``); the split rules below are llama.cpp's for those names (llama-vocab.cpp).
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from cache.prompt.gguf_meta import GGUFFile
from cache.prompt.model_files import WeightLoadError

_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # llama.cpp token types

# llama.cpp's pre-tokenizer regexes by ``tokenizer.ggml.pre`` (llama-vocab.cpp); the BPE merges were
# learned on text split this way, so a different split gives different ids.
_GPT2_NAMES = {"default", "gpt-2", "gpt2", "mpt", "olmo", "jais"}
_DIGITS_THEN_GPT2_NAMES = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_SPLIT_REGEX = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
_SPLIT_REGEX |= {
    "deepseek-r1-qwen": _SPLIT_REGEX["qwen2"],
    **dict.fromkeys(("llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"), _SPLIT_REGEX["llama-bpe"]),
}


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _GPT2_NAMES:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2_NAMES:
        # llama.cpp: "\p{N}" first, then the GPT-2 regex -- every digit is its own pre-token.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _SPLIT_REGEX:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise WeightLoadError(
        f"unsupported GGUF pre-tokenizer {pre!r}; supported: {sorted(_GPT2_NAMES | _DIGITS_THEN_GPT2_NAMES | set(_SPLIT_REGEX))}"
    )


def backend_from_gguf(meta: GGUFFile) -> BackendTokenizer:
    """A byte-level BPE tokenizer that splits text exactly as llama.cpp does for this file."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise WeightLoadError(
            f"{meta.path}: GGUF tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')"
        )
    tokens: list[str] = meta.get("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]
    backend = BackendTokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    )
    backend.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    backend.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [])
    # Control tokens (<|im_start|>) and user-defined ones are matched whole in raw text, never split.
    backend.add_special_tokens(
        [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, t in enumerate(types)
            if t == _GGUF_CONTROL
        ]
    )
    backend.add_tokens(
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types)
            if t == _GGUF_USER_DEFINED
        ]
    )
    bos = meta.get("tokenizer.ggml.bos_token_id", None)
    if bos is not None and meta.get("tokenizer.ggml.add_bos_token", False):
        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", special_tokens=[(tokens[bos], bos)]
        )
    return backend
