"""Chat messages -> prompt token ids. Torch-free and shared by the engine server and the gateway,
so the gateway tokenizes exactly as the worker does (that is what makes its prefix hashes match)."""

from __future__ import annotations

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


def chat_prompt_ids(tokenizer: Tokenizer, messages: Any) -> list[int]:
    """Render the chat template (with the generation prompt) and tokenize, as the engine serves it."""
    try:
        text = tokenizer.apply_chat_template(normalize_messages(messages), add_generation_prompt=True)
    except InvalidMessages:
        raise
    except Exception as exc:  # jinja2 errors, raise_exception() in the template
        raise InvalidMessages(f"the chat template rejected the messages: {exc}") from None
    return tokenizer.encode(text, add_special_tokens=False)
