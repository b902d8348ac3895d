"""Reading answers: text, usage and errors from OpenAI and SGLang shapes; hostile fields read as absent."""

from __future__ import annotations

import pytest

from cache.api.replies import (
    DONE,
    BadChunk,
    Usage,
    chunk_error,
    chunk_text,
    is_usage_only,
    parse_chunk,
    reply_text,
    reply_usage,
    sse_data,
)


def test_sse_lines() -> None:
    assert sse_data(b'data: {"a": 1}\n') == b'{"a": 1}'
    assert sse_data(b"data: [DONE]\n") == DONE
    assert sse_data(b"\n") is None and sse_data(b": ping\n") is None and sse_data(b"event: x\n") is None
    with pytest.raises(BadChunk):
        parse_chunk(b"{not json")
    with pytest.raises(BadChunk):
        parse_chunk(b"[1, 2]")


def test_text_of_chat_completions_and_generate() -> None:
    assert chunk_text({"choices": [{"delta": {"content": "He"}}]}) == "He"
    assert chunk_text({"choices": [{"delta": {"role": "assistant"}}]}) == ""
    assert chunk_text({"choices": [{"text": "llo"}]}) == "llo"
    assert chunk_text({"text": "Hello so far", "meta_info": {}}) == "Hello so far"
    assert reply_text({"choices": [{"message": {"content": "Hi"}}]}) == "Hi"
    assert reply_text({"choices": [{"text": "Hi"}]}) == "Hi"
    assert reply_text({"text": "Hi", "meta_info": {}}) == "Hi"


def test_usage_from_openai_and_sglang() -> None:
    openai = {
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 8}}
    }
    assert reply_usage(openai) == Usage(10, 2, 8)
    assert reply_usage(
        {"meta_info": {"prompt_tokens": 10, "completion_tokens": 2, "cached_tokens": 4}}
    ) == Usage(10, 2, 4)
    assert reply_usage({"choices": []}) is None
    assert is_usage_only({"choices": [], **openai}) and not is_usage_only({"choices": [{}], **openai})


@pytest.mark.parametrize(
    "hostile",
    [
        {"usage": {"prompt_tokens": "10", "completion_tokens": -1, "prompt_tokens_details": "x"}},
        {"usage": {"prompt_tokens": True, "prompt_tokens_details": {"cached_tokens": 1.5}}},
        {"choices": "nope"},
        {"choices": [None, 3, {"delta": None}]},
        {"choices": [{"message": {"content": 5}}]},
        {"text": ["not", "a", "string"]},
    ],
)
def test_hostile_fields_read_as_absent(hostile) -> None:
    usage = reply_usage(hostile)
    assert usage is None or usage == Usage(None, None, None)
    assert chunk_text(hostile) == "" and reply_text(hostile) == ""


def test_error_events() -> None:
    assert chunk_error({"error": {"message": "boom", "type": "server_error"}}) == "boom"
    assert chunk_error({"error": "plain"}) == "plain"
    assert chunk_error({"choices": []}) is None
