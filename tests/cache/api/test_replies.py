"""Reading answers: text, usage and errors from OpenAI and SGLang shapes; hostile fields read as absent."""

from __future__ import annotations

import pytest

from cache.api.replies import (
    DONE,
    BadChunk,
    KVFetch,
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


def test_our_engines_fetched_tokens_and_fetch_time() -> None:
    """A worker that ran a fetch plan says how many of its cached tokens came from the peer, and how long
    the fetch took; a worker that did not says nothing (None, not 0)."""
    details = {"cached_tokens": 512, "kv_fetched_tokens": 496, "kv_fetch_seconds": 0.012}
    openai = {"usage": {"prompt_tokens": 600, "completion_tokens": 2, "prompt_tokens_details": details}}
    assert reply_usage(openai) == Usage(600, 2, 512, KVFetch(496, 0.012))
    meta = {"meta_info": {"prompt_tokens": 600, "cached_tokens": 512, "kv_fetched_tokens": 0}}
    assert reply_usage(meta) == Usage(600, None, 512, KVFetch(0, None))
    assert reply_usage({"usage": {"prompt_tokens": 1}}) == Usage(1, None, None, None)
    for seconds in (-1, float("nan"), float("inf"), "0.1", True):  # a bad time: the count still stands
        bad = {"usage": {"prompt_tokens_details": {"kv_fetched_tokens": 16, "kv_fetch_seconds": seconds}}}
        assert reply_usage(bad) == Usage(None, None, None, KVFetch(16, None))
    for tokens in (-16, 1.5, "16", None, False):  # not a count: no fetch reported
        bad = {"usage": {"prompt_tokens_details": {"kv_fetched_tokens": tokens, "kv_fetch_seconds": 1}}}
        assert reply_usage(bad) == Usage()


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
