"""Tool use end to end: the official ``anthropic`` and ``openai`` SDKs through the gateway to a real engine
serving the tiny Qwen2 checkpoint (``tests/tiny_qwen2.py``, whose greedy answer calls ``get_weather`` until
a tool answers): a tool call, its result rendered back, the answer read from the cached conversation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI

from cache.prompt.tokenizer import Tokenizer
from engine.config import EngineConfig
from gateway.config import GatewayConfig, RoutingConfig
from tests.engine.server.conftest import EngineServer, serve_engine
from tests.gateway.conftest import running_gateway
from tests.tiny_qwen2 import ANSWER, ANTHROPIC_WEATHER_TOOL, CALL_ARGUMENTS, RESPONSES_WEATHER_TOOL

pytestmark = pytest.mark.slow  # a real engine

QUESTION = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def engine(tiny_qwen2_dir: Path) -> Iterator[EngineServer]:
    with serve_engine(
        EngineConfig(model=str(tiny_qwen2_dir), dtype="float32", kv_cache_tokens=8192)
    ) as server:
        yield server


def gateway(engine: EngineServer, tiny_qwen2_dir: Path):
    config = GatewayConfig(
        workers=(engine.url,),
        routing=RoutingConfig(policy="cache_aware"),
        health_interval_s=3600,
        ingest_kv_events=False,
    )
    return running_gateway(config, Tokenizer.from_dir(tiny_qwen2_dir))


async def test_anthropic_tool_use_round_trip(engine: EngineServer, tiny_qwen2_dir: Path) -> None:
    async with gateway(engine, tiny_qwen2_dir) as (base, _):
        claude = AsyncAnthropic(base_url=base, api_key="unused", max_retries=0)
        system = [{"type": "text", "text": "You check the weather.", "cache_control": {"type": "ephemeral"}}]
        question = {"role": "user", "content": QUESTION}
        first = await claude.messages.create(
            model=engine.model_id,
            max_tokens=16,
            system=system,  # type: ignore[arg-type]
            messages=[question],  # type: ignore[list-item]
            tools=[ANTHROPIC_WEATHER_TOOL],  # type: ignore[list-item]
            extra_body={"temperature": 0},
        )
        assert first.stop_reason == "tool_use"
        [use] = first.content
        assert use.type == "tool_use" and (use.name, use.input) == ("get_weather", CALL_ARGUMENTS)
        result = {"type": "tool_result", "tool_use_id": use.id, "content": "18 degrees, clear"}
        async with claude.messages.stream(
            model=engine.model_id,
            max_tokens=16,
            system=system,  # type: ignore[arg-type]
            messages=[
                question,
                {"role": "assistant", "content": first.content},
                {"role": "user", "content": [result]},
            ],  # type: ignore[list-item]
            tools=[ANTHROPIC_WEATHER_TOOL],  # type: ignore[list-item]
            extra_body={"temperature": 0},
        ) as stream:
            second = await stream.get_final_message()
        assert second.stop_reason == "end_turn" and second.content[0].text == ANSWER  # type: ignore[union-attr]
        u = first.usage
        first_prompt = (
            u.input_tokens + (u.cache_creation_input_tokens or 0) + (u.cache_read_input_tokens or 0)
        )
        assert (second.usage.cache_read_input_tokens or 0) >= first_prompt - 32  # the first turn, tools too


async def test_responses_function_call_round_trip(engine: EngineServer, tiny_qwen2_dir: Path) -> None:
    async with gateway(engine, tiny_qwen2_dir) as (base, _):
        client = AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        tool = RESPONSES_WEATHER_TOOL
        first = await client.responses.create(
            model=engine.model_id,
            input=QUESTION,
            tools=[tool],
            temperature=0,  # type: ignore[list-item]
        )
        [call] = first.output
        assert call.type == "function_call" and call.name == "get_weather"
        output = {"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees, clear"}
        second = await client.responses.create(
            model=engine.model_id,
            previous_response_id=first.id,
            input=[output],
            tools=[tool],
            temperature=0,  # type: ignore[list-item]
        )
        assert second.output_text == ANSWER and second.status == "completed"
        assert second.usage is not None and first.usage is not None
        assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 32
