"""The KV-cache request fields (``cache.api.kv_fields``), as ``parse_request`` reads them: retention pins."""

from __future__ import annotations

import pytest

from cache.api.errors import ApiError
from cache.api.kv_fields import KVPin
from cache.api.requests import ServingLimits, parse_request

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def limits(smollm2_tokenizer) -> ServingLimits:
    return ServingLimits(vocab_size=smollm2_tokenizer.vocab_size, max_model_len=64, engine_features=True)


def test_kv_pin_is_parsed_as_retention_pins(smollm2_tokenizer, limits) -> None:
    body = {"messages": MESSAGES, "kv_pin": {"ttl_s": 300}}
    assert parse_request("chat", body, smollm2_tokenizer, limits).kv_pins == (KVPin(300.0),)
    body = {"text": "Hi", "kv_pin": [{"ttl_s": 3600, "tokens": 32}, {"ttl_s": 300.5}]}
    pins = parse_request("generate", body, smollm2_tokenizer, limits).kv_pins
    assert pins == (KVPin(3600.0, 32), KVPin(300.5))
    assert parse_request("completions", {"prompt": "Hi"}, smollm2_tokenizer, limits).kv_pins == ()


@pytest.mark.parametrize(
    "value",
    [
        "300",
        [300],
        {"tokens": 16},
        {"ttl_s": 0},
        {"ttl_s": -5},
        {"ttl_s": float("inf")},
        {"ttl_s": 1e12},
        {"ttl_s": True},
        {"ttl_s": 60, "tokens": 0},
        {"ttl_s": 60, "tokens": "all"},
        [{"ttl_s": 60}] * 5,
    ],
)
def test_malformed_kv_pins_are_400s(smollm2_tokenizer, limits, value) -> None:
    with pytest.raises(ApiError) as caught:
        parse_request("completions", {"prompt": "Hi", "kv_pin": value}, smollm2_tokenizer, limits)
    assert caught.value.status == 400
