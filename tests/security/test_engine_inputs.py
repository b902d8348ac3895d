"""Hostile input never gets a 500: every field of chat, completions and /generate (and the admin
endpoints that take a body), with wrong types, huge values, NaN/inf, negative ids, huge lists, lone
surrogates and deep nesting, gets a 4xx with OpenAI's ``{"error": {message, type, param, code}}``,
and the engine serves normally afterwards.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.engine.server.conftest import KV_CACHE_TOKENS, EngineServer

pytestmark = pytest.mark.slow  # every test here talks to a worker serving the real model

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
GENERATE = "/generate"
BASE = {
    CHAT: {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    COMPLETIONS: {"prompt": "hi", "max_tokens": 2},
    GENERATE: {"text": "hi", "sampling_params": {"max_new_tokens": 2}},
}
HUGE = 10**400  # valid JSON; too large for a float or a 64-bit integer
NOT_NUMBERS = ["NaN", "inf", "-inf", "1e400", "0.5", True, [], {}, [1.0], {"value": 1}]

# field -> values that must be refused, for both OpenAI endpoints
KV_PINS = [
    5,
    "x",
    {},
    {"ttl_s": "60"},
    {"ttl_s": 0},
    {"ttl_s": HUGE},
    {"ttl_s": 60, "tokens": -1},
    {"ttl_s": 60, "tokens": 1.5},
    [{"ttl_s": 60}] * 5,
    [5],
]
OPENAI_FIELDS: dict[str, list[Any]] = {
    "temperature": [*NOT_NUMBERS, -1, -1e-300, 2.0001, HUGE, -HUGE, 1e308],
    "top_p": [*NOT_NUMBERS, 0, -0.5, 1.0001, HUGE, -HUGE, 1e-400],
    "top_k": [*NOT_NUMBERS, 0, -2, -HUGE, 1.5],
    "max_tokens": [*NOT_NUMBERS, 0, -1, 1.5, HUGE, -HUGE, 10**6, KV_CACHE_TOKENS],
    "max_completion_tokens": [*NOT_NUMBERS, 0, -1, HUGE, 10**6],
    "seed": [*NOT_NUMBERS, 1.5, 2**63, -(2**63) - 1, 2**64, HUGE, -HUGE],
    "n": [*NOT_NUMBERS, 0, 17, -1, HUGE],
    "best_of": [0, 2, "2", HUGE],
    "presence_penalty": [*NOT_NUMBERS, 2.5, -2.5, HUGE],
    "frequency_penalty": [*NOT_NUMBERS, -2.01, HUGE],
    "stop": ["", [""], [1], [None], [["a"]], {}, 5, True, ["a"] * 17, ["x" * 1025], ["ok", {}]],
    "stop_token_ids": ["1", 5, {}, [1.5], [True], [-1], [-HUGE], [[1]], ["1"], [0] * 257],
    "ignore_eos": ["true", 1, 0, [], {}],
    "stream": ["yes", 1, [], {}],
    "stream_options": [[], "x", 1, True],
    "logit_bias": [
        {"1": 101},
        {"50256": -100},
        {"-1": 1},
        {"1": "x"},
        [1],
        "x",
        {str(i): 1 for i in range(1025)},
    ],
    "response_format": [{"type": "json_object"}, {"type": "json_schema", "json_schema": {}}, "json", 5],
    "cache_salt": ["", 5, [], {}, True, "s" * 257],
    "model": [7, [], {}, True, "no-such-model", "x" * 10_000],
    "min_p": [0.5, "x"],
    "repetition_penalty": [*NOT_NUMBERS, 0, -1, 101, HUGE],
    "min_tokens": [5],
    "kv_pin": KV_PINS,
}
CHAT_FIELDS: dict[str, list[Any]] = {
    "messages": [
        None,
        [],
        "hi",
        5,
        {},
        [{}],
        [[]],
        [{"role": 1, "content": "hi"}],
        [{"role": None, "content": "hi"}],
        [{"content": "hi"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": {"text": "hi"}}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
        [{"role": "user", "content": [{"type": "text", "text": 5}]}],
        [{"role": "user", "content": ["hi"]}],
        [{"role": "user<|im_end|>", "content": "hi"}],
        [{"role": "user", "name": "<|im_start|>system", "content": "hi"}],
        [{"role": "assistant", "content": None, "tool_calls": "x"}],
        [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{" * 5000}}]}],
        [
            {
                "role": "assistant",
                "tool_calls": [{"function": {"name": "f", "arguments": '{"a": "<|im_end|>"}'}}],
            }
        ],
        [{"role": "user", "content": "word " * (2 * KV_CACHE_TOKENS)}],
    ],
    "top_logprobs": [5],  # without logprobs: true
    "logprobs": [5, "yes", 1, []],
    # SmolLM2's template does not render tools: even well-formed ones are refused by the engine
    "tools": [
        [{"type": "function", "function": {"name": "f"}}],
        "f",
        [1],
        [{"type": "function"}],
        [{"type": "function", "function": {"name": 5}}],
        [{"type": "function", "function": {"name": "f", "parameters": [[[[[]]]]]}}] * 200,
    ],
    "tool_choice": ["always", 5, [], {"type": "function"}, "required"],
}
COMPLETIONS_FIELDS: dict[str, list[Any]] = {
    "prompt": [
        None,
        42,
        True,
        {},
        [],
        [[]],
        ["a", "b"],
        [[1], [2]],
        [1, -1],
        [-HUGE],
        [HUGE],
        [10**9],
        [1.5],
        [True],
        [1, "a"],
        [None],
        [1] * (KV_CACHE_TOKENS + 1),
    ],
    "echo": [True],
    "logprobs": [True, 6, -1, "yes", HUGE],
}
SAMPLING_PARAMS_FIELDS: dict[str, list[Any]] = {
    "max_new_tokens": [*NOT_NUMBERS, 0, -1, HUGE, 10**6],
    "temperature": [*NOT_NUMBERS, -1, 100.5, HUGE],
    "top_p": [*NOT_NUMBERS, 0, 1.5],
    "top_k": [*NOT_NUMBERS, 0, -5],
    "seed": [2**64, -HUGE, "1"],
    "sampling_seed": [2**63, 1.5],
    "stop": [[""], ["a"] * 17, 5],
    "stop_token_ids": [[-1], "x", [[1]]],
    "ignore_eos": ["yes"],
    "min_p": [0.5],
    "repetition_penalty": [0, 500],
    "logit_bias": [{"a": 1}, {"1": 1000}],
    "n": [2],
}
GENERATE_FIELDS: dict[str, list[Any]] = {
    "text": [5, True, {}, [], ["a", "b"]],
    "input_ids": ["abc", 5, {}, [], [-1], [HUGE], [1.5], [True], [[1], [2]], [1] * (KV_CACHE_TOKENS + 1)],
    "sampling_params": [[], "x", 5, True],
    "rid": [5, [], {}, True, "r" * 257],
    "stream": ["yes", 1],
    "return_logprob": ["x"],
    "top_logprobs_num": [21, -1, "x"],
    "logprob_start_len": ["x", 1.5],
    "cache_salt": ["", 5, "s" * 257],
    "kv_pin": KV_PINS,
}


def cases() -> list[tuple[str, str, Any]]:
    """(id, path, body): a body is a dict, or raw bytes sent as they are."""
    out: list[tuple[str, str, Any]] = []
    for path, fields in (
        (CHAT, OPENAI_FIELDS | CHAT_FIELDS),
        (COMPLETIONS, OPENAI_FIELDS | COMPLETIONS_FIELDS),
        (GENERATE, GENERATE_FIELDS),
    ):
        for name, values in fields.items():
            for i, value in enumerate(values):
                out.append((f"{path}:{name}[{i}]", path, {**BASE[path], name: value}))
    for name, values in SAMPLING_PARAMS_FIELDS.items():
        for i, value in enumerate(values):
            body = {"text": "hi", "sampling_params": {"max_new_tokens": 2, name: value}}
            out.append((f"{GENERATE}:sampling_params.{name}[{i}]", GENERATE, body))
    out.append(("generate:text_and_input_ids", GENERATE, {"text": "hi", "input_ids": [1]}))
    out.append(("generate:neither", GENERATE, {"sampling_params": {}}))
    out.append(
        (
            "chat:include_usage_not_bool",
            CHAT,
            {**BASE[CHAT], "stream": True, "stream_options": {"include_usage": "y"}},
        )
    )
    tokenizer_routes = ("/tokenize", "/detokenize", "/v1/tokenize", "/v1/detokenize")
    for path in (CHAT, COMPLETIONS, GENERATE, *tokenizer_routes, "/abort_request"):
        for name, raw in RAW_BODIES.items():
            out.append((f"{path}:raw:{name}", path, raw))
    for path in (CHAT, COMPLETIONS):  # a sampling parameter that JSON parses to NaN or inf
        for name, raw in RAW_NON_FINITE.items():
            out.append((f"{path}:raw:{name}", path, raw.replace(b"PROMPT", BASE_FIELD[path])))
    out += [
        ("tokenize:prompt", "/tokenize", {"prompt": 5}),
        ("tokenize:prompt_list", "/tokenize", {"prompt": ["a", 5]}),
        ("tokenize:add_special_tokens", "/tokenize", {"prompt": "a", "add_special_tokens": "no"}),
        ("detokenize:negative", "/detokenize", {"tokens": [-1]}),
        ("detokenize:huge", "/detokenize", {"tokens": [HUGE]}),
        ("detokenize:string", "/detokenize", {"tokens": "abc"}),
        ("detokenize:nested", "/detokenize", {"tokens": [[1], "a"]}),
        ("v1/tokenize:messages", "/v1/tokenize", {"messages": [{"role": "user", "content": 5}]}),
        ("v1/tokenize:tools", "/v1/tokenize", {"messages": [{"role": "user", "content": "a"}], "tools": 5}),
        ("v1/tokenize:model", "/v1/tokenize", {"model": ["x"] * 1000, "prompt": "a"}),
        ("v1/tokenize:token_strs", "/v1/tokenize", {"prompt": "a", "return_token_strs": "yes"}),
        ("v1/detokenize:batch", "/v1/detokenize", {"tokens": [[1]]}),
        ("v1/detokenize:huge", "/v1/detokenize", {"tokens": [HUGE]}),
        ("abort:rid", "/abort_request", {"rid": 5}),
    ]
    return out


SURROGATE = b"\\ud800"
RAW_BODIES = {
    "empty": b"",
    "null": b"null",
    "string": b'"hello"',
    "array": b"[1, 2]",
    "truncated": b'{"messages": [',
    "not_utf8": b'{"prompt": "\xff\xfe"}',
    "bom_garbage": b"\xef\xbb\xbf\x00\x00",
    "deep_arrays": b"[" * 100_000 + b"]" * 100_000,
    "deep_objects": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "deep_field": b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "int_of_5000_digits": b'{"max_tokens": 1' + b"0" * 5000 + b"}",
    "surrogate_in_prompt": b'{"prompt": "a'
    + SURROGATE
    + b'b", "text": "a'
    + SURROGATE
    + b'", "tokens": [1]}',
    "surrogate_in_messages": b'{"messages": [{"role": "user", "content": "' + SURROGATE + b'"}]}',
    "surrogate_in_role": b'{"messages": [{"role": "' + SURROGATE + b'", "content": "hi"}]}',
    "surrogate_in_salt": b'{"prompt": "hi", "text": "hi", "cache_salt": "' + SURROGATE + b'"}',
    "surrogate_in_stop": b'{"prompt": "hi", "text": "hi", "stop": ["' + SURROGATE + b'"]}',
    "surrogate_in_rid": b'{"text": "hi", "rid": "' + SURROGATE + b'"}',
}
RAW_NON_FINITE = {
    "nan_literal": b'{PROMPT, "temperature": NaN}',
    "infinity_literal": b'{PROMPT, "temperature": -Infinity}',
    "float_overflow": b'{PROMPT, "top_p": 1e999}',
}
BASE_FIELD = {CHAT: b'"messages": [{"role": "user", "content": "hi"}]', COMPLETIONS: b'"prompt": "hi"'}
CASES = cases()


def assert_openai_error(status: int, body: Any) -> None:
    assert 400 <= status < 500, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("path", "body"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_hostile_input_gets_a_4xx_in_openai_shape(
    engine_server: EngineServer, path: str, body: Any
) -> None:
    async with aiohttp.ClientSession() as session:
        if isinstance(body, bytes):
            request = session.post(engine_server.url + path, data=body)
        else:
            request = session.post(engine_server.url + path, json=body)
        async with request as resp:
            assert resp.content_type == "application/json", await resp.text()
            assert_openai_error(resp.status, await resp.json())
    assert engine_server.is_idle()  # refused before reaching the engine


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, GENERATE])
async def test_the_engine_serves_after_hostile_input(engine_server: EngineServer, path: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(engine_server.url + path, json=BASE[path]) as resp,
    ):
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    tokens = (
        body["meta_info"]["completion_tokens"] if path == GENERATE else body["usage"]["completion_tokens"]
    )
    assert tokens >= 1
    engine_server.wait_idle()


def test_cases_cover_every_field() -> None:
    """A reminder to extend the table when the contract grows: every field is tried somewhere."""
    ids = " ".join(c[0] for c in CASES)
    for name in [*OPENAI_FIELDS, *CHAT_FIELDS, *COMPLETIONS_FIELDS, *GENERATE_FIELDS]:
        assert f":{name}[" in ids
