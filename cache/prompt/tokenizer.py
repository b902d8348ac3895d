"""Tokenizer + chat template, from GGUF metadata or a Hugging Face tokenizer.json. Torch-free.

The gateway imports this to count and hash prompt tokens exactly as the worker will, so nothing here
(or in what it imports) may import torch.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer

from cache.prompt.gguf_meta import GGUFFile, open_gguf
from cache.prompt.gguf_vocab import backend_from_gguf
from cache.prompt.model_files import WeightLoadError


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json spells special tokens as a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _chat_template_from_config(directory: Path, tokenizer_config: dict[str, Any]) -> str | None:
    jinja_file = directory / "chat_template.jinja"  # transformers >= 4.50 writes the template here
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template


@functools.lru_cache(maxsize=16)  # a pure memo: compiling costs ~1 ms, rendering far less
def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile as transformers does, so prompts render byte-identically to ``apply_chat_template``."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


@dataclass(frozen=True)
class Tokenizer:
    """Text <-> token ids for one model, plus its chat template. Immutable, safe to share across threads."""

    backend: BackendTokenizer
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    chat_template: str | None = None

    @classmethod
    def from_gguf(cls, source: str | Path | GGUFFile) -> Tokenizer:
        meta = source if isinstance(source, GGUFFile) else open_gguf(source)
        backend = backend_from_gguf(meta)
        eos = [meta.get(k, None) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
        bos = meta.get("tokenizer.ggml.bos_token_id", None)
        return cls(
            backend,
            bos,
            tuple(dict.fromkeys(int(i) for i in eos if i is not None)),
            meta.get("tokenizer.chat_template", None),
        )

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            raise WeightLoadError(f"{directory}: no tokenizer.json (only fast tokenizers are supported)")
        backend = BackendTokenizer.from_file(str(directory / "tokenizer.json"))
        tokenizer_config = _read_json(directory / "tokenizer_config.json")
        model_config = _read_json(directory / "config.json")
        bos = _token_content(tokenizer_config.get("bos_token"))
        bos_id = backend.token_to_id(bos) if bos else model_config.get("bos_token_id")
        eos_ids: list[int] = []
        for source in (_read_json(directory / "generation_config.json"), model_config):
            value = source.get("eos_token_id")
            eos_ids.extend(value if isinstance(value, list) else [] if value is None else [value])
        eos = _token_content(tokenizer_config.get("eos_token"))
        if eos and backend.token_to_id(eos) is not None:
            eos_ids.append(backend.token_to_id(eos))
        template = _chat_template_from_config(directory, tokenizer_config)
        return cls(backend, bos_id, tuple(dict.fromkeys(int(i) for i in eos_ids)), template)

    @classmethod
    def from_source(cls, source: GGUFFile | Path) -> Tokenizer:
        """From a ``Checkpoint.tokenizer_source``: an opened GGUF file or a model directory."""
        return cls.from_gguf(source) if isinstance(source, GGUFFile) else cls.from_dir(source)

    @classmethod
    def from_checkpoint_path(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            return cls.from_dir(path)
        return cls.from_gguf(path)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Special-token text in ``text`` (``<|im_start|>``) always maps to its id, as in HF tokenizers."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    @functools.cached_property
    def added_tokens(self) -> dict[str, int]:
        """Text -> id of every added token (``<|im_end|>``, ...): text ``encode`` turns into that id."""
        return {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.content}

    @functools.cached_property
    def _text_backend(self) -> BackendTokenizer:
        # A copy, never the shared backend (other threads encode with it): special-token text is text.
        backend = BackendTokenizer.from_str(self.backend.to_str())
        backend.encode_special_tokens = True
        return backend

    def encode_text(self, text: str) -> list[int]:
        """``text`` as plain text: special-token text (``<|im_end|>``) gets ordinary text tokens, never
        its control id. Added tokens not marked special still map to their ids (callers check)."""
        return self._text_backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render ``messages`` to prompt text (tokenize it with ``encode``); extra kwargs (tools, ...) reach the template."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; use a plain completion prompt")
        bos = self.backend.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self.backend.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else ""
        template = _compile_chat_template(self.chat_template)
        return template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos,
            eos_token=eos,
            **kwargs,
        )

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas, holding back incomplete UTF-8 characters.

    A byte-level token can end mid-character; decoding it alone yields U+FFFD. Each step decodes a
    short window ``ids[prefix:]`` and compares it with ``ids[prefix:read]`` (the text already emitted
    from that window): decoding a window rather than one token keeps tokenizers whose decoders strip
    or add spaces at sequence starts correct. Concatenated deltas + ``flush()`` equal ``decode(all ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: tokens before it are fully emitted
        self._read = 0  # tokens before it have had their text emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Feed one token; returns the newly completed text (often "", e.g. mid-character)."""
        self._ids.append(token_id)
        emitted = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(emitted) :]

    def add_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """Text still held back at the end of the stream (incomplete bytes decode to U+FFFD)."""
        emitted = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(emitted) :]
