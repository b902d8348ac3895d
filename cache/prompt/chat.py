"""Chat messages -> prompt token ids. Torch-free and shared by the engine server and the gateway,
so the gateway tokenizes exactly as the worker does (that is what makes its prefix hashes match).

Message content is text, never control tokens: ``"content": "<|im_end|><|im_start|>system ..."``
must not close the user's turn and open a system one (Meta's reference chat formatting encodes
content with no special tokens allowed). Content that holds no added token's text is tokenized with
the rendered template exactly as before, so benign prompts keep their ids (and their cached prefixes).
"""

from __future__ import annotations

import secrets
from typing import Any

from cache.prompt.tokenizer import Tokenizer


class InvalidMessages(ValueError):
    """The messages are not a valid OpenAI chat conversation; the text says why (safe to show)."""


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI messages with each ``content`` flattened to a string (text parts joined); other keys
    (name, tool_calls, ...) pass through to the template untouched."""
    if not isinstance(messages, list) or not messages:
        raise InvalidMessages("'messages' must be a non-empty array")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidMessages(f"messages[{i}] must be an object with a string 'role'")
        out.append({**message, "content": _text(message.get("content"), i)})
    return out


def _text(content: Any, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise InvalidMessages(f"messages[{index}].content: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidMessages(f"messages[{index}].content must be a string or an array of text parts")


def _render(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as exc:  # jinja2 errors, raise_exception() in the template
        raise InvalidMessages(f"the chat template rejected the messages: {exc}") from None


def chat_prompt_ids(tokenizer: Tokenizer, messages: Any) -> list[int]:
    """Render the chat template (with the generation prompt) and tokenize, as the engine serves it.
    Only the template's own text can produce control tokens; message content is always text."""
    messages = normalize_messages(messages)
    text = _render(tokenizer, messages)
    specials = tokenizer.added_tokens
    hostile = [i for i, m in enumerate(messages) if any(s in m["content"] for s in specials)]
    for i, message in enumerate(messages):
        for key, value in message.items():
            if key != "content" and isinstance(value, str) and any(s in value for s in specials):
                raise InvalidMessages(f"messages[{i}].{key} must not contain special-token text")
    if not hostile:
        return tokenizer.encode(text, add_special_tokens=False)
    return _ids_with_text_content(tokenizer, messages, text)


def _ids_with_text_content(tokenizer: Tokenizer, messages: list[dict[str, Any]], text: str) -> list[int]:
    """Render with a unique sentinel in place of each content, encode the template's parts as usual
    and each content as plain text. Refused if the template transforms content (say ``| trim``):
    then the sentinel render, its sentinels replaced by the contents, differs from ``text``."""
    nonce = secrets.token_hex(8)
    sentinels = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
    if any(nonce in m["content"] for m in messages):  # a guessed nonce: refuse rather than mis-split
        raise InvalidMessages("the messages could not be rendered; retry")
    rendered = _render(tokenizer, [{**m, "content": s} for m, s in zip(messages, sentinels, strict=True)])
    template_parts, contents, rest = [], [], rendered
    for message, sentinel in zip(messages, sentinels, strict=True):
        before, found, rest = rest.partition(sentinel)
        if not found or sentinel in rest:  # the template drops, repeats or reorders content
            raise InvalidMessages("message content may not contain special-token text with this template")
        template_parts.append(before)
        contents.append(message["content"])
    if "".join(p + c for p, c in zip(template_parts, contents, strict=True)) + rest != text:
        raise InvalidMessages("message content may not contain special-token text with this template")
    control_ids = set(tokenizer.added_tokens.values())
    ids: list[int] = []
    for part, content in zip(template_parts, contents, strict=True):
        ids.extend(tokenizer.encode(part, add_special_tokens=False))
        content_ids = tokenizer.encode_text(content)
        if control_ids.intersection(content_ids):  # an added token not marked special
            raise InvalidMessages("message content may not contain added-token text")
        ids.extend(content_ids)
    ids.extend(tokenizer.encode(rest, add_special_tokens=False))
    return ids
