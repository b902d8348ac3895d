"""A chat request's ``tools`` and ``tool_choice``: checked here, rendered by the chat template
(``cache.prompt.chat``), and the output parser they call for (``cache.prompt.tool_calls``).

``tools`` are part of the prompt: the template renders them (as transformers does) before the messages,
so the gateway hashes them into the prefix and identical tool lists share cached blocks. The engine
parses tool calls out of its answer when the request has tools, ``tool_choice`` is not ``none``, and the
template names a format a parser knows; otherwise the answer stays text. The engine refuses tools its
model's template does not render (they would be dropped silently) and forced calls (``required`` or a
named function need constrained decoding); the gateway leaves both to its upstream and hashes what the
template renders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cache.api.errors import bad_request
from cache.prompt.chat import renders_tools
from cache.prompt.tokenizer import Tokenizer
from cache.prompt.tool_calls import parser_for_template

MAX_TOOLS = 128  # OpenAI's bound
MAX_TOOL_NAME_CHARS = 256


@dataclass(frozen=True)
class ToolRequest:
    """``tools``: the definitions to render (as sent), None without any. ``parser``: the
    ``cache.prompt.tool_calls`` parser for the answer, None to leave it text."""

    tools: list[dict[str, Any]] | None = None
    parser: str | None = None


def get_tools(body: dict[str, Any], tokenizer: Tokenizer, engine_features: bool) -> ToolRequest:
    """The request's tools and what to do with the answer; 400 for malformed fields (``engine_features``:
    also for what the embedded engine cannot do)."""
    tools = _tool_list(body.get("tools"))
    choice = body.get("tool_choice")
    names = {t["function"]["name"] for t in tools or ()}
    if choice is None:
        choice = "auto" if tools else "none"
    elif isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise bad_request(
                "'tool_choice' must be 'none', 'auto', 'required' or "
                "{'type': 'function', 'function': {'name': ...}}",
                "tool_choice",
            )
        if name not in names:
            raise bad_request(f"'tool_choice' names a function not in 'tools': {name[:64]!r}", "tool_choice")
    elif choice not in ("none", "auto", "required"):
        raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or a function", "tool_choice")
    elif choice == "required" and not tools:
        raise bad_request("'tool_choice' 'required' needs 'tools'", "tool_choice")
    if body.get("parallel_tool_calls") is not None and not isinstance(body["parallel_tool_calls"], bool):
        raise bad_request("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if engine_features and (choice == "required" or isinstance(choice, dict)):
        raise bad_request(
            "this engine cannot force a tool call ('tool_choice' 'required' or a named function); "
            "use 'auto' or 'none'",
            "tool_choice",
        )
    if engine_features and tools and not renders_tools(tokenizer.chat_template):
        raise bad_request("this model's chat template does not render tools", "tools")
    parser = parser_for_template(tokenizer.chat_template) if tools and choice != "none" else None
    return ToolRequest(tools, parser)


def _tool_list(value: Any) -> list[dict[str, Any]] | None:
    """OpenAI's ``[{"type": "function", "function": {"name", "description"?, "parameters"?}}]``."""
    if value is None or value == []:
        return None
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise bad_request(f"'tools' must be an array of at most {MAX_TOOLS} tools", "tools")
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise bad_request(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", "tools")
        name = function.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_TOOL_NAME_CHARS:
            message = f"tools[{i}].function.name must be a string of 1 to {MAX_TOOL_NAME_CHARS} characters"
            raise bad_request(message, "tools")
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise bad_request(f"tools[{i}].function.description must be a string", "tools")
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise bad_request(f"tools[{i}].function.parameters must be a JSON Schema object", "tools")
    return value
