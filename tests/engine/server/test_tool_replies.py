"""The engine's tool-call replies, fed known model output (random weights never call a tool): a whole
choice's message and finish reason, and the same answer streamed as chat deltas in any pieces."""

from __future__ import annotations

import json
from typing import Any

import pytest

from engine.server.tool_replies import ToolCallStream, apply_tool_calls

CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
OUTPUTS = {
    "a call": (f"<tool_call>\n{CALL}\n</tool_call>", None, ["get_weather"]),
    "text and two calls": (
        f"Checking.\n<tool_call>{CALL}</tool_call>\n<tool_call>{CALL}</tool_call>",
        "Checking.",
        ["get_weather"] * 2,
    ),
    "plain text": ("It is sunny.\n", "It is sunny.\n", []),
    "malformed": ("<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    "cut off": (f"<tool_call>{CALL[:30]}", f"<tool_call>{CALL[:30]}", []),
}


def choice(text: str, finish_reason: str) -> dict[str, Any]:
    return {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": finish_reason,
    }


@pytest.mark.parametrize("name", list(OUTPUTS))
@pytest.mark.parametrize("reason", ["stop", "length"])
def test_a_whole_choice_gets_its_calls(name: str, reason: str) -> None:
    text, content, names = OUTPUTS[name]
    out = apply_tool_calls(choice(text, reason), "hermes")
    message = out["message"]
    assert message["content"] == content
    assert [c["function"]["name"] for c in message.get("tool_calls", [])] == names
    for call in message.get("tool_calls", []):
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert len({c["id"] for c in message.get("tool_calls", [])}) == len(names)  # ids unique
    assert out["finish_reason"] == ("tool_calls" if names and reason == "stop" else reason)


@pytest.mark.parametrize("name", list(OUTPUTS))
@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_a_streamed_choice_sends_content_and_whole_calls(name: str, step: int) -> None:
    text, content, names = OUTPUTS[name]
    stream, deltas = ToolCallStream("hermes"), []
    for start in range(0, len(text), step):
        deltas += stream.feed(text[start : start + step])
    deltas += stream.finish()
    streamed = "".join(d.get("content", "") for d in deltas)
    assert streamed == (content or "")
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [c["index"] for c in calls] == list(range(len(names)))
    assert [c["function"]["name"] for c in calls] == names
    assert all(json.loads(c["function"]["arguments"]) == {"city": "Paris"} for c in calls)
    assert stream.finish_reason("stop") == ("tool_calls" if names else "stop")
    assert stream.finish_reason("length") == "length"
