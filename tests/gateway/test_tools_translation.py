"""Tools through ``/v1/responses`` and ``/v1/messages`` against a stub worker that calls a tool the way
OpenAI-compatible servers stream one (its arguments in pieces), through the official SDKs: function tools
and calls translated both ways, tool results rendered back, and a chain continued on its cached prefix."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from aiohttp import web
from anthropic import AsyncAnthropic, BadRequestError
from openai import AsyncOpenAI

from cache.api.errors import ApiError
from cache.api.sse import send_done, send_event
from cache.prompt.tokenizer import Tokenizer
from gateway.messages_api import translate
from gateway.responses_api import chat_body
from tests.gateway.stub_gateways import gateways_over
from tests.gateway.test_dispatch import StubWorker
from tests.tiny_qwen2 import ANTHROPIC_WEATHER_TOOL, RESPONSES_WEATHER_TOOL, WEATHER_TOOL

ARGUMENTS = '{"city": "Paris"}'
USAGE = {
    "prompt_tokens": 40,
    "completion_tokens": 6,
    "total_tokens": 46,
    "prompt_tokens_details": {"cached_tokens": 32},
}


@dataclass
class ToolWorker(StubWorker):
    """Calls ``get_weather`` (after ``preface`` text, if any) until the last message is a tool result, then
    answers "Sunny". Streams the call as vLLM does: id and name first, the arguments in two parts."""

    preface: str = ""

    async def complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        answered = body["messages"][-1]["role"] == "tool"
        call = {
            "id": "call_abc",
            "type": "function",
            "function": {"name": "get_weather", "arguments": ARGUMENTS},
        }
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": "Sunny"}
            if not answered:
                message = {"role": "assistant", "content": self.preface or None, "tool_calls": [call]}
            choice = {"index": 0, "message": message, "finish_reason": "stop" if answered else "tool_calls"}
            return web.json_response({"object": "chat.completion", "choices": [choice], "usage": USAGE})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        if answered:
            deltas += [{"content": "Sun"}, {"content": "ny"}]
        else:
            deltas += [{"content": self.preface}] if self.preface else []
            first = {**call, "index": 0, "function": {"name": "get_weather", "arguments": ARGUMENTS[:7]}}
            deltas += [
                {"tool_calls": [first]},
                {"tool_calls": [{"index": 0, "function": {"arguments": ARGUMENTS[7:]}}]},
            ]
        for delta in deltas:
            await send_event(response, {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
        reason = "stop" if answered else "tool_calls"
        await send_event(response, {"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            await send_event(response, {"choices": [], "usage": USAGE})
        await send_done(response)
        return response


def openai_client(base: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0)


def anthropic_client(base: str) -> AsyncAnthropic:
    return AsyncAnthropic(base_url=base, api_key="none", max_retries=0)


QUESTION = "What is the weather in Paris?"
CHAT_TOOLS = [
    {
        "type": "function",
        "function": {k: WEATHER_TOOL["function"][k] for k in ("name", "description", "parameters")},
    }
]
ASSISTANT_CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}
    ],
}


# -- /v1/responses ----------------------------------------------------------------------------------
async def test_a_response_calls_a_tool_and_a_chain_answers_from_its_output(
    tiny_qwen2_tokenizer: Tokenizer,
) -> None:
    worker = ToolWorker()
    async with gateways_over(tiny_qwen2_tokenizer, [worker]) as [(base, _)]:
        client = openai_client(base)
        first = await client.responses.create(
            model="stub-model",
            input=QUESTION,
            tools=[RESPONSES_WEATHER_TOOL],
            tool_choice="auto",
            parallel_tool_calls=False,
        )
        [call] = first.output
        assert call.type == "function_call" and (call.call_id, call.name) == ("call_abc", "get_weather")
        assert json.loads(call.arguments) == {"city": "Paris"} and first.output_text == ""
        assert first.tools[0].name == "get_weather"  # type: ignore[union-attr]
        output = {"type": "function_call_output", "call_id": call.call_id, "output": "18 C, clear"}
        second = await client.responses.create(
            model="stub-model", previous_response_id=first.id, input=[output]
        )
        assert second.output_text == "Sunny"
        # The same conversation sent without the store (the output items replayed) reaches the worker alike.
        replay = [{"role": "user", "content": QUESTION}, call.model_dump(exclude_none=True), output]
        third = await client.responses.create(
            model="stub-model", input=replay, tools=[RESPONSES_WEATHER_TOOL]
        )
        assert third.output_text == "Sunny"
    sent = worker.bodies
    assert sent[0]["tools"] == CHAT_TOOLS and (sent[0]["tool_choice"], sent[0]["parallel_tool_calls"]) == (
        "auto",
        False,
    )
    tool = {"role": "tool", "tool_call_id": "call_abc", "content": "18 C, clear"}
    assert sent[1]["messages"] == [{"role": "user", "content": QUESTION}, ASSISTANT_CALL, tool]
    assert sent[2]["messages"] == sent[1]["messages"]


async def test_a_streamed_response_sends_the_function_call_events(tiny_qwen2_tokenizer: Tokenizer) -> None:
    worker = ToolWorker(preface="Let me check.")
    async with gateways_over(tiny_qwen2_tokenizer, [worker]) as [(base, _)]:
        stream = await openai_client(base).responses.create(
            model="stub-model", input=QUESTION, tools=[RESPONSES_WEATHER_TOOL], stream=True
        )
        events = [event async for event in stream]
    types = [e.type for e in events]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",  # the message, index 0
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",  # the call, index 1
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]  # type: ignore[union-attr]
    assert "".join(deltas) == ARGUMENTS and len(deltas) == 2
    done = events[-1].response  # type: ignore[union-attr]
    assert [item.type for item in done.output] == ["message", "function_call"]
    assert done.output_text == "Let me check." and done.output[1].arguments == ARGUMENTS  # type: ignore[union-attr]


async def test_responses_refuse_tools_they_cannot_translate(tiny_qwen2_tokenizer: Tokenizer) -> None:
    async with gateways_over(tiny_qwen2_tokenizer, [ToolWorker()]) as [(base, _)]:
        client = openai_client(base)
        for fields in (
            {"tools": [{"type": "file_search", "vector_store_ids": ["v"]}]},
            {"tools": [RESPONSES_WEATHER_TOOL], "tool_choice": {"type": "file_search"}},
            {"input": [{"type": "function_call_output", "output": "x"}]},  # no call_id
        ):
            with pytest.raises(openai.BadRequestError):
                await client.responses.create(**{"model": "stub-model", "input": QUESTION, **fields})


# -- /v1/messages -------------------------------------------------------------------------------------
async def test_a_message_uses_a_tool_and_answers_from_its_result(tiny_qwen2_tokenizer: Tokenizer) -> None:
    worker = ToolWorker(preface="Let me check.")
    async with gateways_over(tiny_qwen2_tokenizer, [worker]) as [(base, _)]:
        claude = anthropic_client(base)
        question = {"role": "user", "content": QUESTION}
        first = await claude.messages.create(
            model="stub-model",
            max_tokens=20,
            messages=[question],
            tools=[ANTHROPIC_WEATHER_TOOL],  # type: ignore[list-item]
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
        )
        assert first.stop_reason == "tool_use"
        text, use = first.content
        assert text.type == "text" and text.text == "Let me check."  # type: ignore[union-attr]
        assert use.type == "tool_use" and (use.id, use.name, use.input) == (
            "call_abc",
            "get_weather",
            {"city": "Paris"},
        )
        result = {"type": "tool_result", "tool_use_id": use.id, "content": [{"type": "text", "text": "18 C"}]}
        second = await claude.messages.create(
            model="stub-model",
            max_tokens=20,
            messages=[
                question,
                {"role": "assistant", "content": first.content},
                {"role": "user", "content": [result]},
            ],  # type: ignore[list-item]
            tools=[ANTHROPIC_WEATHER_TOOL],  # type: ignore[list-item]
        )
        assert second.stop_reason == "end_turn" and second.content[0].text == "Sunny"  # type: ignore[union-attr]
    sent = worker.bodies
    assert sent[0]["tools"] == CHAT_TOOLS
    assert (sent[0]["tool_choice"], sent[0]["parallel_tool_calls"]) == ("required", False)
    assistant = {**ASSISTANT_CALL, "content": "Let me check."}
    assert sent[1]["messages"] == [
        question,
        assistant,
        {"role": "tool", "tool_call_id": "call_abc", "content": "18 C"},
    ]


async def test_a_streamed_message_streams_the_tool_use_block(tiny_qwen2_tokenizer: Tokenizer) -> None:
    async with gateways_over(tiny_qwen2_tokenizer, [ToolWorker()]) as [(base, _)]:
        stream_call = anthropic_client(base).messages.stream(
            model="stub-model",
            max_tokens=20,
            messages=[{"role": "user", "content": QUESTION}],
            tools=[ANTHROPIC_WEATHER_TOOL],  # type: ignore[list-item]
        )
        async with stream_call as stream:
            events = [event async for event in stream]
            final = await stream.get_final_message()
    raw = [e for e in events if e.type.startswith(("content_block", "message"))]
    assert [e.type for e in raw] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert raw[1].content_block.type == "tool_use"  # type: ignore[union-attr]
    assert "".join(e.delta.partial_json for e in raw[2:4]) == ARGUMENTS  # type: ignore[union-attr]
    assert final.stop_reason == "tool_use" and [b.type for b in final.content] == ["tool_use"]
    assert final.content[0].input == {"city": "Paris"}  # type: ignore[union-attr]


async def test_messages_refuse_server_tools(tiny_qwen2_tokenizer: Tokenizer) -> None:
    async with gateways_over(tiny_qwen2_tokenizer, [ToolWorker()]) as [(base, _)]:
        with pytest.raises(BadRequestError) as refused:
            await anthropic_client(base).messages.create(
                model="stub-model",
                max_tokens=5,
                messages=[{"role": "user", "content": QUESTION}],
                tools=[{"type": "web_search_20250305", "name": "web_search"}],  # type: ignore[list-item]
            )
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


def test_a_breakpoint_on_the_tools_names_a_session_by_them() -> None:
    def session(description: str) -> str | None:
        tool = {**ANTHROPIC_WEATHER_TOOL, "description": description, "cache_control": {"type": "ephemeral"}}
        chat, name, ttl_s = translate(
            {"max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}], "tools": [tool]}
        )
        assert "cache_control" not in json.dumps(chat["tools"]) and ttl_s == 300
        return name

    assert session("Weather.") == session("Weather.") != session("The weather.")
    assert session("Weather.") is not None


HOSTILE_MESSAGES = [
    {"tools": "x"},
    {"tools": [5]},
    {"tools": [{"name": "f"}]},
    {"tools": [{"name": 5, "input_schema": {}}]},
    {"tools": [{"name": "f", "input_schema": {}, "cache_control": {"type": "forever"}}]},
    {"tool_choice": "any"},
    {"tool_choice": {"type": "sometimes"}},
    {
        "messages": [
            {"role": "assistant", "content": [{"type": "tool_use", "id": "x", "name": "f", "input": "x"}]}
        ]
    },
    {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "f", "input": {}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "x", "name": "f", "input": {}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": 5}]}]},
    {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "content": 5}]}]},
    {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "x", "content": [{"type": "image"}]}],
            }
        ]
    },
    {"messages": [{"role": "assistant", "content": [5]}]},
]
HOSTILE_RESPONSES = [
    {"tools": "x"},
    {"tools": [{"type": "function", "name": "f"}, {"type": "mcp"}]},
    {"tool_choice": {"type": "allowed_tools"}},
    {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
    {"input": [{"type": "function_call", "call_id": "c", "name": 5, "arguments": "{}"}]},
    {"input": [{"type": "function_call_output", "call_id": "c", "output": 5}]},
    {"input": [{"type": "reasoning", "summary": []}]},
    {"input": [5]},
]


@pytest.mark.parametrize("fields", HOSTILE_MESSAGES)
def test_hostile_message_tools_are_400s(fields: dict[str, Any]) -> None:
    body = {"max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}], **fields}
    with pytest.raises(ApiError) as refused:
        translate(body)
    assert refused.value.status == 400


@pytest.mark.parametrize("fields", HOSTILE_RESPONSES)
def test_hostile_response_tools_are_400s(fields: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as refused:
        chat_body({"input": "Hi", **fields}, [])
    assert refused.value.status == 400
