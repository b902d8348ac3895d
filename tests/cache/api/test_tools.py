"""``tools`` and ``tool_choice`` in the request contract: their shape is checked on every side; the engine
also refuses what it cannot do (a template that drops tools, a forced call), the gateway leaves that to
its upstream; the parser for the answer is named only when calls are to be read out of it."""

from __future__ import annotations

from typing import Any

import pytest

from cache.api.errors import ApiError
from cache.api.requests import ServingLimits, parse_request
from cache.prompt.tokenizer import Tokenizer
from tests.tiny_qwen2 import WEATHER_TOOL

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def engine(tokenizer: Tokenizer) -> ServingLimits:
    return ServingLimits(vocab_size=tokenizer.vocab_size, engine_features=True)


def gateway(tokenizer: Tokenizer) -> ServingLimits:
    return ServingLimits(vocab_size=tokenizer.vocab_size)


@pytest.mark.parametrize(
    ("fields", "parser"),
    [
        ({"tools": [WEATHER_TOOL]}, "hermes"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "auto", "parallel_tool_calls": False}, "hermes"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "none"}, None),  # rendered, the answer stays text
        ({"tools": []}, None),
        ({"tool_choice": "none"}, None),
        ({}, None),
    ],
)
def test_the_answer_is_parsed_when_the_request_lets_the_model_call(
    tiny_qwen2_tokenizer: Tokenizer, fields: dict[str, Any], parser: str | None
) -> None:
    req = parse_request(
        "chat", {"messages": MESSAGES, **fields}, tiny_qwen2_tokenizer, engine(tiny_qwen2_tokenizer)
    )
    assert req.tool_parser == parser
    with_tools = "tools" in fields and fields["tools"]
    plain = parse_request("chat", {"messages": MESSAGES}, tiny_qwen2_tokenizer, engine(tiny_qwen2_tokenizer))
    assert (req.prompt_ids != plain.prompt_ids) == bool(with_tools)  # tool_choice none still renders them


BAD_TOOLS = [
    "f",
    {"type": "function"},
    [{"type": "function"}],
    [{"type": "code_interpreter"}],
    [{"type": "function", "function": {"name": ""}}],
    [{"type": "function", "function": {"name": 5}}],
    [{"type": "function", "function": {"name": "x" * 257}}],
    [{"type": "function", "function": {"name": "f", "description": 5}}],
    [{"type": "function", "function": {"name": "f", "parameters": []}}],
    [WEATHER_TOOL] * 129,
]
BAD_CHOICES = [
    "always",
    5,
    {"type": "function"},
    {"type": "function", "function": {"name": "nope"}},
    {"name": "f"},
]


@pytest.mark.parametrize("tools", BAD_TOOLS)
def test_malformed_tools_are_400s_on_every_side(tiny_qwen2_tokenizer: Tokenizer, tools: Any) -> None:
    for limits in (engine(tiny_qwen2_tokenizer), gateway(tiny_qwen2_tokenizer)):
        with pytest.raises(ApiError) as refused:
            parse_request("chat", {"messages": MESSAGES, "tools": tools}, tiny_qwen2_tokenizer, limits)
        assert refused.value.status == 400 and refused.value.param == "tools"


@pytest.mark.parametrize("choice", BAD_CHOICES)
def test_malformed_tool_choices_are_400s_on_every_side(tiny_qwen2_tokenizer: Tokenizer, choice: Any) -> None:
    body = {"messages": MESSAGES, "tools": [WEATHER_TOOL], "tool_choice": choice}
    for limits in (engine(tiny_qwen2_tokenizer), gateway(tiny_qwen2_tokenizer)):
        with pytest.raises(ApiError) as refused:
            parse_request("chat", body, tiny_qwen2_tokenizer, limits)
        assert refused.value.status == 400 and refused.value.param == "tool_choice"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": NAMED}, "tool_choice"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
)
def test_the_engine_cannot_force_a_call(
    tiny_qwen2_tokenizer: Tokenizer, fields: dict[str, Any], param: str
) -> None:
    body = {"messages": MESSAGES, "tools": [WEATHER_TOOL], **fields}
    with pytest.raises(ApiError) as refused:
        parse_request("chat", body, tiny_qwen2_tokenizer, engine(tiny_qwen2_tokenizer))
    assert refused.value.param == param
    if param == "tool_choice":  # an upstream that can constrain decoding may serve it
        assert parse_request("chat", body, tiny_qwen2_tokenizer, gateway(tiny_qwen2_tokenizer)).tool_parser


def test_tools_a_template_cannot_render_are_refused_by_the_engine_only(smollm2_tokenizer: Tokenizer) -> None:
    body = {"messages": MESSAGES, "tools": [WEATHER_TOOL]}
    with pytest.raises(ApiError) as refused:
        parse_request("chat", body, smollm2_tokenizer, engine(smollm2_tokenizer))
    assert refused.value.param == "tools" and "does not render tools" in refused.value.message
    forwarded = parse_request("chat", body, smollm2_tokenizer, gateway(smollm2_tokenizer))
    plain = parse_request("chat", {"messages": MESSAGES}, smollm2_tokenizer, gateway(smollm2_tokenizer))
    assert forwarded.prompt_ids == plain.prompt_ids and forwarded.tool_parser is None
