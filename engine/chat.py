"""Chat messages -> prompt token ids. Torch-free and shared by the engine server and the gateway,
so the gateway tokenizes exactly as the worker does (that is what makes its prefix hashes match)."""

from __future__ import annotations

from typing import Any

from engine.tokenizer import Tokenizer

ROLES = ("system", "developer", "user", "assistant", "tool")


class InvalidMessages(ValueError):
    """The messages are not a valid OpenAI chat conversation; the text says why (safe to show)."""


def normalize_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI messages -> ``[{"role", "content": str}]``. Content parts of type text are joined."""
    if not isinstance(messages, list) or not messages:
        raise InvalidMessages("'messages' must be a non-empty array")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidMessages(f"messages[{i}] must be an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InvalidMessages(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        if content is None:
            content = ""
        if isinstance(content, list):
            parts = []
            for part in content:
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    raise InvalidMessages(f"messages[{i}].content: only text parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise InvalidMessages(f"messages[{i}].content must be a string or an array of text parts")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def chat_prompt_ids(tokenizer: Tokenizer, messages: Any) -> list[int]:
    """Render the chat template (with the generation prompt) and tokenize, as the engine serves it."""
    text = tokenizer.apply_chat_template(normalize_messages(messages), add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)
