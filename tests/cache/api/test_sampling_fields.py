"""The fields only the embedded engine reads (n, logprobs, penalties, logit_bias): what each body
becomes, and OpenAI-style 400s naming the field for values out of OpenAI's (or vLLM's) ranges."""

from __future__ import annotations

from typing import Any

import pytest

from cache.api.errors import ApiError
from cache.api.requests import ServingLimits, parse_request
from cache.api.sampling import SamplingParams

MESSAGES = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def limits(smollm2_tokenizer) -> ServingLimits:
    return ServingLimits(vocab_size=smollm2_tokenizer.vocab_size, max_model_len=64, engine_features=True)


def sampling(tokenizer, limits, kind: str, **fields: Any) -> SamplingParams:
    prompt = {"chat": {"messages": MESSAGES}, "completions": {"prompt": "hi"}, "generate": {"text": "hi"}}[
        kind
    ]
    return parse_request(kind, {**prompt, **fields}, tokenizer, limits).sampling  # type: ignore[arg-type]


def test_openai_fields_reach_the_sampler(smollm2_tokenizer, limits) -> None:
    chat = sampling(
        smollm2_tokenizer,
        limits,
        "chat",
        n=3,
        seed=7,
        logprobs=True,
        top_logprobs=20,
        presence_penalty=-2,
        frequency_penalty=2.0,
        repetition_penalty=1.3,
        logit_bias={"15": 100, "0": -100, "49151": 0.5},
    )
    assert (chat.n, chat.seed, chat.logprobs) == (3, 7, 20)
    assert (chat.presence_penalty, chat.frequency_penalty, chat.repetition_penalty) == (-2.0, 2.0, 1.3)
    assert chat.logit_bias == ((15, 100.0), (0, -100.0), (49151, 0.5))
    assert sampling(smollm2_tokenizer, limits, "chat", logprobs=True).logprobs == 0
    assert sampling(smollm2_tokenizer, limits, "chat", logprobs=False, top_logprobs=0).logprobs is None
    assert sampling(smollm2_tokenizer, limits, "completions", logprobs=5).logprobs == 5
    assert sampling(smollm2_tokenizer, limits, "completions", logprobs=0).logprobs == 0
    plain = sampling(smollm2_tokenizer, limits, "chat")
    assert plain.n == 1 and plain.logprobs is None and not plain.adjusts_logits


def test_sglang_fields_reach_the_sampler(smollm2_tokenizer, limits) -> None:
    params = {
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repetition_penalty": 0.9,
        "logit_bias": {"3": 1},
    }
    s = sampling(
        smollm2_tokenizer, limits, "generate", sampling_params=params, return_logprob=True, top_logprobs_num=4
    )
    assert s.logprobs == 4 and s.logit_bias == ((3, 1.0),) and s.repetition_penalty == 0.9
    assert sampling(smollm2_tokenizer, limits, "generate", top_logprobs_num=4).logprobs is None  # not asked
    assert sampling(smollm2_tokenizer, limits, "generate", return_logprob=True).logprobs == 0


@pytest.mark.parametrize(
    ("kind", "fields", "param"),
    [
        ("chat", {"n": 0}, "n"),
        ("chat", {"n": 17}, "n"),
        ("chat", {"n": 2.0}, "n"),
        ("chat", {"n": 2, "seed": 2**63 - 1}, "seed"),
        ("chat", {"logprobs": 1}, "logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("chat", {"top_logprobs": 3}, "top_logprobs"),  # OpenAI: needs logprobs: true
        ("completions", {"logprobs": 6}, "logprobs"),
        ("completions", {"logprobs": True}, "logprobs"),
        ("completions", {"logprobs": -1}, "logprobs"),
        ("completions", {"echo": True}, "echo"),
        ("chat", {"presence_penalty": 2.01}, "presence_penalty"),
        ("chat", {"frequency_penalty": -3}, "frequency_penalty"),
        ("chat", {"frequency_penalty": "1"}, "frequency_penalty"),
        ("chat", {"repetition_penalty": 0}, "repetition_penalty"),
        ("chat", {"repetition_penalty": -1.2}, "repetition_penalty"),
        ("chat", {"repetition_penalty": 101}, "repetition_penalty"),
        ("chat", {"logit_bias": {"1": 100.5}}, "logit_bias"),
        ("chat", {"logit_bias": {"1": "5"}}, "logit_bias"),
        ("chat", {"logit_bias": {"1": True}}, "logit_bias"),
        ("chat", {"logit_bias": {"-1": 5}}, "logit_bias"),
        ("chat", {"logit_bias": {"49152": 5}}, "logit_bias"),  # one past the vocabulary
        ("chat", {"logit_bias": {"1e3": 5}}, "logit_bias"),
        ("chat", {"logit_bias": {"٣": 5}}, "logit_bias"),  # a digit, not an ASCII one
        ("chat", {"logit_bias": {"1": 5, "01": 5}}, "logit_bias"),
        ("chat", {"logit_bias": {"9" * 5000: 5}}, "logit_bias"),
        ("chat", {"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
        ("chat", {"logit_bias": [1, 2]}, "logit_bias"),
        ("generate", {"sampling_params": {"n": 2}}, "n"),
        ("generate", {"sampling_params": {"presence_penalty": 3}}, "presence_penalty"),
        ("generate", {"sampling_params": {"logit_bias": {"x": 1}}}, "logit_bias"),
        ("generate", {"return_logprob": True, "top_logprobs_num": 21}, "top_logprobs_num"),
        ("generate", {"return_logprob": True, "logprob_start_len": 0}, "logprob_start_len"),
    ],
)
def test_out_of_range_values_are_400s_naming_the_field(
    smollm2_tokenizer, limits, kind, fields, param
) -> None:
    with pytest.raises(ApiError) as refused:
        sampling(smollm2_tokenizer, limits, kind, **fields)
    assert refused.value.status == 400 and refused.value.param == param
    assert refused.value.body()["error"]["type"] == "invalid_request_error"


def test_the_gateway_passes_engine_only_values_through(smollm2_tokenizer) -> None:
    """Another upstream may draw these ranges differently: the gateway neither reads nor refuses them."""
    gateway = ServingLimits(vocab_size=smollm2_tokenizer.vocab_size)
    body = {"messages": MESSAGES, "n": 64, "logprobs": 7, "repetition_penalty": 500, "logit_bias": {"x": 1}}
    s = parse_request("chat", body, smollm2_tokenizer, gateway).sampling
    assert s.n == 1 and s.logprobs is None and s.repetition_penalty == 1.0 and s.logit_bias == ()
