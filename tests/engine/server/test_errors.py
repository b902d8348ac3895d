"""Bad input gets an OpenAI-style error body with the right 4xx, on every endpoint, streaming or not."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.engine.server.conftest import KV_CACHE_TOKENS, EngineServer

pytestmark = pytest.mark.slow  # every test here talks to a worker serving the real model

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": MESSAGES, "max_tokens": 2, **fields}


CASES = {
    # name: (path, body (dict, or raw bytes), status, param)
    "malformed_json": (CHAT, b'{"messages": [', 400, None),
    "body_not_an_object": (CHAT, b"[1, 2]", 400, None),
    "unknown_model": (CHAT, chat(model="gpt-17"), 404, "model"),
    "unknown_model_completions": (COMPLETIONS, {"model": "gpt-17", "prompt": "x"}, 404, "model"),
    "messages_missing": (CHAT, {"max_tokens": 2}, 400, "messages"),
    "messages_empty": (CHAT, chat(messages=[]), 400, "messages"),
    "messages_wrong_type": (CHAT, chat(messages="hello"), 400, "messages"),
    "message_without_role": (CHAT, chat(messages=[{"content": "hi"}]), 400, "messages"),
    "message_content_wrong_type": (CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages"),
    "image_content": (
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        "messages",
    ),
    "prompt_missing": (COMPLETIONS, {"max_tokens": 2}, 400, "prompt"),
    "prompt_wrong_type": (COMPLETIONS, {"prompt": 42}, 400, "prompt"),
    "prompt_batch": (COMPLETIONS, {"prompt": ["a", "b"]}, 400, "prompt"),
    "prompt_token_out_of_vocab": (COMPLETIONS, {"prompt": [1, 10**9]}, 400, "prompt"),
    "prompt_longer_than_context": (COMPLETIONS, {"prompt": [100] * (KV_CACHE_TOKENS + 50)}, 400, "prompt"),
    "chat_longer_than_context": (
        CHAT,
        chat(messages=[{"role": "user", "content": "word " * 2000}]),
        400,
        "messages",
    ),
    "max_tokens_zero": (CHAT, chat(max_tokens=0), 400, "max_tokens"),
    "max_tokens_negative": (COMPLETIONS, {"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    "max_completion_tokens_zero": (CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    "max_tokens_string": (CHAT, chat(max_tokens="ten"), 400, "max_tokens"),
    "max_tokens_bool": (CHAT, chat(max_tokens=True), 400, "max_tokens"),
    "temperature_string": (CHAT, chat(temperature="hot"), 400, "temperature"),
    "temperature_negative": (CHAT, chat(temperature=-0.5), 400, "temperature"),
    "temperature_too_high": (CHAT, chat(temperature=3), 400, "temperature"),
    "top_p_zero": (CHAT, chat(top_p=0), 400, "top_p"),
    "top_p_above_one": (CHAT, chat(top_p=1.5), 400, "top_p"),
    "top_k_zero": (CHAT, chat(top_k=0), 400, "top_k"),
    "seed_float": (CHAT, chat(seed=1.5), 400, "seed"),
    "stop_wrong_type": (CHAT, chat(stop=7), 400, "stop"),
    "stop_empty_string": (CHAT, chat(stop=[""]), 400, "stop"),
    "stream_not_bool": (CHAT, chat(stream="yes"), 400, "stream"),
    "n_above_the_bound": (CHAT, chat(n=17), 400, "n"),
    "n_seeds_overflow": (CHAT, chat(n=2, seed=2**63 - 1), 400, "seed"),
    "chat_logprobs_not_bool": (CHAT, chat(logprobs=2), 400, "logprobs"),
    "chat_top_logprobs_above_20": (CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    "chat_top_logprobs_without_logprobs": (CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    "completion_logprobs_above_5": (COMPLETIONS, {"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    "completion_echo": (COMPLETIONS, {"prompt": "x", "echo": True}, 400, "echo"),
    "presence_penalty_above_2": (CHAT, chat(presence_penalty=2.5), 400, "presence_penalty"),
    "frequency_penalty_below_minus_2": (
        COMPLETIONS,
        {"prompt": "x", "frequency_penalty": -3},
        400,
        "frequency_penalty",
    ),
    "repetition_penalty_zero": (CHAT, chat(repetition_penalty=0), 400, "repetition_penalty"),
    "logit_bias_out_of_vocab": (CHAT, chat(logit_bias={"99999999": 1}), 400, "logit_bias"),
    "logit_bias_above_100": (CHAT, chat(logit_bias={"5": 150}), 400, "logit_bias"),
    "tools": (CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    "bad_input_in_a_stream_request": (CHAT, chat(stream=True, max_tokens=0), 400, "max_tokens"),
    "generate_without_input": ("/generate", {"sampling_params": {"max_new_tokens": 2}}, 400, "text"),
    "generate_with_both_inputs": ("/generate", {"text": "a", "input_ids": [1]}, 400, "text"),
    "generate_batch": ("/generate", {"text": ["a", "b"]}, 400, "text"),
    "generate_bad_input_ids": ("/generate", {"input_ids": ["a"]}, 400, "input_ids"),
    "generate_empty_input_ids": ("/generate", {"input_ids": []}, 400, "input_ids"),
    "generate_too_long": ("/generate", {"input_ids": [5] * KV_CACHE_TOKENS}, 400, "input_ids"),
    "generate_max_new_tokens_zero": (
        "/generate",
        {"text": "a", "sampling_params": {"max_new_tokens": 0}},
        400,
        "max_new_tokens",
    ),
    "generate_sampling_params_wrong_type": (
        "/generate",
        {"text": "a", "sampling_params": [1]},
        400,
        "sampling_params",
    ),
    "generate_top_logprobs_above_20": (
        "/generate",
        {"text": "a", "return_logprob": True, "top_logprobs_num": 21},
        400,
        "top_logprobs_num",
    ),
    "generate_prompt_logprobs": (
        "/generate",
        {"text": "a", "return_logprob": True, "logprob_start_len": 0},
        400,
        "logprob_start_len",
    ),
    "tokenize_wrong_type": ("/tokenize", {"prompt": 3}, 400, "prompt"),
    "detokenize_out_of_vocab": ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    "abort_without_rid": ("/abort_request", {}, 400, "rid"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_input_gets_an_openai_error(engine_server: EngineServer, case: str) -> None:
    path, body, status, param = CASES[case]
    async with aiohttp.ClientSession() as session:
        kwargs = (
            {"data": body, "headers": {"Content-Type": "application/json"}}
            if isinstance(body, bytes)
            else {"json": body}
        )
        async with session.post(engine_server.url + path, **kwargs) as resp:
            assert resp.status == status, await resp.text()
            assert resp.content_type == "application/json"
            error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert isinstance(error["message"], str) and error["message"]
    if case.endswith("longer_than_context") or case == "generate_too_long":
        assert error["code"] == "context_length_exceeded"
    if case.startswith("unknown_model"):
        assert error["code"] == "model_not_found"


async def test_unknown_route_and_wrong_method(engine_server: EngineServer) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(engine_server.url + "/v1/nothing") as resp:
            assert resp.status == 404 and (await resp.json())["error"]["type"] == "invalid_request_error"
        async with session.get(engine_server.url + CHAT) as resp:
            assert resp.status == 405 and "error" in await resp.json()


async def test_server_still_serves_after_bad_input(engine_server: EngineServer) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(engine_server.url + CHAT, json=chat(max_tokens=1)) as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["usage"]["completion_tokens"] == 1
    engine_server.wait_idle()
