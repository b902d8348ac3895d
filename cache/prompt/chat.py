"""Chat messages -> prompt token ids. Torch-free and shared by the engine server and the gateway,
so the gateway tokenizes exactly as the worker does (that is what makes its prefix hashes match).

Message content is text, never control tokens: ``"content": "<|im_end|><|im_start|>system ..."``
must not close the user's turn and open a system one (Meta's reference chat formatting encodes
content with no special tokens allowed). Content that holds no added token's text is tokenized with
the rendered template exactly as before, so benign prompts keep their ids (and their cached prefixes).

Tools render as transformers' ``apply_chat_template(messages, tools=tools)`` renders them: the tool
definitions as the client sent them, ``tools=None`` without any, and assistant ``tool_calls`` arguments
(JSON text on the OpenAI wire) parsed into objects first, as transformers' templates expect and vLLM
does. So the gateway hashes a tool list exactly as the worker prefills it: identical lists, identical
prefix blocks.
"""

from __future__ import annotations

import functools
import json
import secrets
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta

from cache.prompt.tokenizer import Tokenizer


class InvalidMessages(ValueError):
    """The messages (or, with ``param`` "tools", the tools) are not a valid OpenAI chat conversation;
    the text says why (safe to show)."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


@functools.lru_cache(maxsize=16)  # a pure memo on the template's text
def renders_tools(chat_template: str | None) -> bool:
    """Whether the template reads the ``tools`` variable (else it drops tool definitions silently)."""
    if not chat_template:
        return False
    try:
        ast = jinja2.Environment(extensions=[jinja2.ext.loopcontrols]).parse(chat_template)
    except jinja2.TemplateError:
        return False  # a template we cannot parse cannot render anything
    return "tools" in jinja2.meta.find_undeclared_variables(ast)


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
        if message.get("tool_calls") is not None:
            out[-1]["tool_calls"] = _tool_calls(message["tool_calls"], i)
    return out


def _tool_calls(calls: Any, index: int) -> list[dict[str, Any]]:
    """An assistant's ``tool_calls`` with each ``function.arguments`` as an object (copies: the
    request body is forwarded as it came)."""
    where = f"messages[{index}].tool_calls"
    if not isinstance(calls, list):
        raise InvalidMessages(f"{where} must be an array")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidMessages(
                f"{where}[{j}] must be an object with a 'function' that has a string 'name'"
            )
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except (ValueError, RecursionError):
                raise InvalidMessages(f"{where}[{j}].function.arguments must be JSON text") from None
        out.append({**call, "function": {**function, "arguments": arguments}})
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


def _render(tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: list[Any] | None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
    except Exception as exc:  # jinja2 errors, raise_exception() in the template
        raise InvalidMessages(f"the chat template rejected the messages: {exc}") from None


def chat_prompt_ids(tokenizer: Tokenizer, messages: Any, tools: list[Any] | None = None) -> list[int]:
    """Render the chat template (with the generation prompt and ``tools``, if any) and tokenize, as the
    engine serves it. Only the template's own text can produce control tokens; message content is
    always text, and special-token text anywhere else (names, tool calls, tool definitions) is refused."""
    messages = normalize_messages(messages)
    specials = tokenizer.added_tokens
    for i, message in enumerate(messages):
        for key, value in message.items():
            if key != "content" and _holds_any(value, specials):
                raise InvalidMessages(f"messages[{i}].{key} must not contain special-token text")
    if _holds_any(tools, specials):
        raise InvalidMessages("tool definitions must not contain special-token text", "tools")
    text = _render(tokenizer, messages, tools or None)
    if not any(any(s in m["content"] for s in specials) for m in messages):
        return tokenizer.encode(text, add_special_tokens=False)
    return _ids_with_text_content(tokenizer, messages, tools or None, text)


def _holds_any(value: Any, texts: dict[str, int]) -> bool:
    """Whether any string in a JSON value (keys included) contains one of ``texts``. Iterative: a
    client's nesting depth must not become a RecursionError."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if any(t in item for t in texts):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return False


def _ids_with_text_content(
    tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: list[Any] | None, text: str
) -> list[int]:
    """Render with a unique sentinel in place of each non-empty content, encode the template's parts as
    usual and each content as plain text. Refused if the template transforms content (say ``| trim``):
    then the sentinel render, its sentinels replaced by the contents, differs from ``text``. Empty
    contents stay empty (templates test them: ``{% if message.content %}``), they hold no text anyway."""
    nonce = secrets.token_hex(8)
    sentinels = [f"\ue000{nonce}:{i}\ue001" if m["content"] else "" for i, m in enumerate(messages)]
    if any(nonce in m["content"] for m in messages):  # a guessed nonce: refuse rather than mis-split
        raise InvalidMessages("the messages could not be rendered; retry")
    rendered = _render(
        tokenizer, [{**m, "content": s} for m, s in zip(messages, sentinels, strict=True)], tools
    )
    template_parts, contents, rest = [], [], rendered
    for message, sentinel in zip(messages, sentinels, strict=True):
        if not sentinel:
            continue
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
