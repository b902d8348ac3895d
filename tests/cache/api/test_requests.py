"""The request contract: one body -> the same prompt ids on every side, and bad bodies -> 400s."""

from __future__ import annotations

import pytest

from cache.api.errors import ApiError
from cache.api.requests import ServingLimits, parse_request
from cache.prompt.chat import chat_prompt_ids

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def limits(smollm2_tokenizer) -> ServingLimits:
    return ServingLimits(vocab_size=smollm2_tokenizer.vocab_size, max_model_len=64, engine_features=True)


def test_chat_body_gives_the_rendered_template_ids(smollm2_tokenizer, limits) -> None:
    body = {
        "messages": MESSAGES,
        "temperature": 0,
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
        "cache_salt": "t1",
    }
    req = parse_request("chat", body, smollm2_tokenizer, limits)
    text = smollm2_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert req.prompt_ids == smollm2_tokenizer.encode(text) == chat_prompt_ids(smollm2_tokenizer, MESSAGES)
    assert req.sampling.greedy and req.sampling.max_tokens == 5
    assert req.stream and req.include_usage and req.cache_salt == "t1"


def test_text_and_ids_prompts_agree_across_apis(smollm2_tokenizer, limits) -> None:
    ids = smollm2_tokenizer.encode("Hello, my name is", add_special_tokens=True)
    as_text = parse_request("completions", {"prompt": "Hello, my name is"}, smollm2_tokenizer, limits)
    as_ids = parse_request("completions", {"prompt": [ids]}, smollm2_tokenizer, limits)
    native = parse_request("generate", {"text": "Hello, my name is", "rid": "r1"}, smollm2_tokenizer, limits)
    assert as_text.prompt_ids == as_ids.prompt_ids == native.prompt_ids == ids
    assert native.rid == "r1" and native.sampling.max_tokens == 128  # SGLang's default


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        ("chat", {"messages": []}, "messages"),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ("chat", {"messages": MESSAGES, "temperature": 3}, "temperature"),
        ("chat", {"messages": MESSAGES, "top_p": 0}, "top_p"),
        ("chat", {"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ("chat", {"messages": MESSAGES, "stream": "yes"}, "stream"),
        ("chat", {"messages": MESSAGES, "stream_options": []}, "stream_options"),
        ("chat", {"messages": MESSAGES, "n": 17}, "n"),
        ("chat", {"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
        ("chat", {"messages": MESSAGES, "model": 7}, "model"),
        ("completions", {}, "prompt"),
        ("completions", {"prompt": ["a", "b"]}, "prompt"),
        ("completions", {"prompt": [1, 2, 10**9]}, "prompt"),
        ("completions", {"prompt": "word " * 80}, "prompt"),
        ("generate", {"text": "a", "input_ids": [1]}, "text"),
        ("generate", {"input_ids": [1, True]}, "input_ids"),
        ("generate", {"text": "a", "sampling_params": {"top_k": 0}}, "top_k"),
    ],
)
def test_bad_bodies_are_400s_naming_the_field(smollm2_tokenizer, limits, kind, body, param) -> None:
    with pytest.raises(ApiError) as refused:
        parse_request(kind, body, smollm2_tokenizer, limits)
    assert refused.value.status == 400 and refused.value.param == param


def test_the_gateway_leaves_engine_only_limits_to_the_upstream(smollm2_tokenizer) -> None:
    gateway = ServingLimits(vocab_size=smollm2_tokenizer.vocab_size)
    tools = [{"type": "function", "function": {"name": "f"}}]  # SmolLM2's template does not render tools
    body = {"messages": MESSAGES, "n": 2, "logprobs": True, "tools": tools, "tool_choice": "required"}
    assert parse_request("chat", body, smollm2_tokenizer, gateway).prompt_ids


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        ("chat", {"messages": MESSAGES, "seed": 2**63}, "seed"),
        ("generate", {"text": "a", "sampling_params": {"sampling_seed": -(2**63) - 1}}, "sampling_seed"),
        ("chat", {"messages": MESSAGES, "temperature": 10**400}, "temperature"),
        ("chat", {"messages": MESSAGES, "presence_penalty": -(10**400)}, "presence_penalty"),
        ("chat", {"messages": MESSAGES, "stop": ["s"] * 17}, "stop"),
        ("chat", {"messages": MESSAGES, "stop": ["s" * 1025]}, "stop"),
        ("chat", {"messages": MESSAGES, "stop_token_ids": [1] * 257}, "stop_token_ids"),
        ("chat", {"messages": MESSAGES, "stop_token_ids": {}}, "stop_token_ids"),
        ("chat", {"messages": MESSAGES, "stop_token_ids": [-1]}, "stop_token_ids"),
        ("chat", {"messages": MESSAGES, "cache_salt": "s" * 257}, "cache_salt"),
        ("chat", {"messages": MESSAGES, "max_tokens": 60}, "max_tokens"),  # prompt + 60 > 64
        ("chat", {"messages": MESSAGES, "max_completion_tokens": 10**30}, "max_completion_tokens"),
        ("generate", {"text": "a", "sampling_params": {"max_new_tokens": 64}}, "max_new_tokens"),
        ("generate", {"text": "a", "rid": "r" * 257}, "rid"),
        ("chat", {"messages": MESSAGES, "logit_bias": {"1": 101}}, "logit_bias"),
        ("chat", {"messages": MESSAGES, "response_format": {"type": "json_object"}}, "response_format"),
        ("completions", {"prompt": "a", "min_p": 0.1}, "min_p"),
        ("generate", {"text": "a", "sampling_params": {"repetition_penalty": 0}}, "repetition_penalty"),
        ("chat", {"messages": [{"role": "user<|im_end|>", "content": "x"}]}, "messages"),
    ],
)
def test_values_vllm_or_openai_refuse_are_400s(smollm2_tokenizer, limits, kind, body, param) -> None:
    with pytest.raises(ApiError) as refused:
        parse_request(kind, body, smollm2_tokenizer, limits)
    assert refused.value.status == 400 and refused.value.param == param


def test_sound_extremes_are_accepted(smollm2_tokenizer, limits) -> None:
    body = {"messages": MESSAGES, "temperature": 1e-300, "top_k": 10**30, "seed": -(2**63), "top_p": 1e-300}
    sampling = parse_request("chat", body, smollm2_tokenizer, limits).sampling
    assert sampling.greedy  # below vLLM's 1e-5, as vLLM does: no division by ~0
    assert parse_request(
        "chat", {"messages": MESSAGES, "response_format": {"type": "text"}}, smollm2_tokenizer, limits
    )
