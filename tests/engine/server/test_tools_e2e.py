"""Tools against a real engine serving a tiny Qwen2 checkpoint built in the test (``tests/tiny_qwen2.py``:
Qwen2.5's chat template, q/k/v biases, a planted tool call), through the official ``openai`` SDK: a tool
call, its result, the answer; streamed too; the tool list cached as part of the prefix."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from engine.config import EngineConfig
from engine.weights import load_checkpoint
from tests.engine.server.conftest import EngineServer, serve_engine
from tests.tiny_qwen2 import ANSWER, CALL_ARGUMENTS, CALL_TEXT, WEATHER_TOOL

pytestmark = pytest.mark.slow  # a real engine

QUESTION = {"role": "user", "content": "What is the weather in Paris?"}
PAGE = 16


@pytest.fixture(scope="module")
def server(tiny_qwen2_dir: Path) -> Iterator[EngineServer]:
    config = EngineConfig(model=str(tiny_qwen2_dir), dtype="float32", kv_cache_tokens=8192, page_size=PAGE)
    with serve_engine(config) as running:
        yield running


@pytest.fixture
def client(server: EngineServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_the_checkpoint_is_a_qwen2_with_biases_as_transformers_reads_it(tiny_qwen2_dir: Path, server) -> None:
    config = load_checkpoint(tiny_qwen2_dir).config
    assert config.architecture == "qwen2" and config.attention_bias
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir), dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(
        [QUESTION], tools=[WEATHER_TOOL], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt) :]
    # transformers' own Qwen2 runs the planted call too: the checkpoint is a plain Qwen2.
    assert tokenizer.decode(out, skip_special_tokens=True) == f"<tool_call>{CALL_TEXT}</tool_call>"


def test_a_tool_call_its_result_and_the_answer(server: EngineServer, client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=server.model_id, messages=[QUESTION], tools=[WEATHER_TOOL], temperature=0
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == CALL_ARGUMENTS
    messages = [
        QUESTION,
        choice.message.model_dump(exclude_none=True),  # the assistant's turn, as the SDK hands it back
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and a clear sky"},
    ]
    second = client.chat.completions.create(
        model=server.model_id, messages=messages, tools=[WEATHER_TOOL], temperature=0
    )
    assert second.choices[0].message.content == ANSWER and second.choices[0].finish_reason == "stop"
    assert not second.choices[0].message.tool_calls
    assert second.usage is not None and first.usage is not None
    cached = second.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    assert cached >= first.usage.prompt_tokens // PAGE * PAGE - PAGE  # the first turn's prompt, tools too


def test_a_streamed_tool_call(server: EngineServer, client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=server.model_id,
        messages=[QUESTION],
        tools=[WEATHER_TOOL],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [t for d in deltas for t in d.tool_calls or []]
    assert [(t.index, t.function.name) for t in calls] == [(0, "get_weather")]  # type: ignore[union-attr]
    assert json.loads(calls[0].function.arguments) == CALL_ARGUMENTS  # type: ignore[union-attr,arg-type]
    assert "".join(d.content or "" for d in deltas) == ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_tool_choice_none_leaves_the_answer_text_and_required_is_refused(
    server: EngineServer, client: openai.OpenAI
) -> None:
    plain = client.chat.completions.create(
        model=server.model_id, messages=[QUESTION], tools=[WEATHER_TOOL], tool_choice="none", temperature=0
    )
    assert plain.choices[0].message.content == f"<tool_call>{CALL_TEXT}</tool_call>"
    assert plain.choices[0].finish_reason == "stop" and not plain.choices[0].message.tool_calls
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=server.model_id, messages=[QUESTION], tools=[WEATHER_TOOL], tool_choice="required"
        )
    assert refused.value.body["param"] == "tool_choice"  # type: ignore[index]


def test_identical_tool_lists_hit_the_same_cached_blocks(server: EngineServer, client: openai.OpenAI) -> None:
    system = {"role": "system", "content": "You answer weather questions for the harbour office."}
    time_tool = {
        "type": "function",
        "function": {"name": "now", "description": "The time.", "parameters": {}},
    }

    def cached(question: str, tools: list) -> tuple[int, int]:
        reply = client.chat.completions.create(
            model=server.model_id,
            messages=[system, {"role": "user", "content": question}],
            tools=tools,
            max_tokens=1,
            temperature=0,
        )
        assert reply.usage is not None
        return reply.usage.prompt_tokens_details.cached_tokens, reply.usage.prompt_tokens  # type: ignore[union-attr]

    tokenizer = server.state.tokenizer
    tools_part = len(
        tokenizer.encode(tokenizer.apply_chat_template([system], tools=[WEATHER_TOOL, time_tool]))
    )
    first, _ = cached("Rain tomorrow?", [WEATHER_TOOL, time_tool])
    second, _ = cached("Wind at noon?", [WEATHER_TOOL, time_tool])
    assert first < PAGE <= tools_part // PAGE * PAGE - PAGE <= second
    described = {**time_tool, "function": {**time_tool["function"], "description": "The local time."}}
    other, _ = cached("Wind at noon?", [WEATHER_TOOL, described])
    assert other < second  # another tool list: only what precedes the change is shared
