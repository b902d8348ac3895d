"""vLLM's ``/v1/tokenize`` and ``/v1/detokenize`` at the engine (SGLang's ``/tokenize`` is covered in
test_sglang_api.py), and a request's ``kv_pin`` as the engine's metrics report it."""

from __future__ import annotations

import aiohttp
import pytest

from cache.prompt.chat import chat_prompt_ids
from tests.engine.server.conftest import EngineServer

pytestmark = pytest.mark.slow  # a worker serving the real model

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|> there"}]


async def post(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, dict]:
    async with session.post(url, json=body) as answer:
        return answer.status, await answer.json()


async def test_vllm_tokenize_shapes(engine_server: EngineServer) -> None:
    tokenizer, info = engine_server.engine.tokenizer, engine_server.engine.info
    url = engine_server.url
    async with aiohttp.ClientSession() as session:
        status, text = await post(
            session, url + "/v1/tokenize", {"model": info.model_id, "prompt": "Hello world"}
        )
        assert status == 200
        ids = tokenizer.encode("Hello world", add_special_tokens=True)
        assert text == {
            "count": len(ids),
            "max_model_len": info.max_model_len,
            "tokens": ids,
            "token_strs": None,
        }
        _, named = await post(
            session, url + "/v1/tokenize", {"prompt": "Hello world", "return_token_strs": True}
        )
        assert named["token_strs"] == [tokenizer.backend.id_to_token(t) for t in ids]
        # messages: the prompt a chat request with them costs (special-token text in content is text)
        _, chat = await post(session, url + "/v1/tokenize", {"messages": MESSAGES})
        assert chat["tokens"] == chat_prompt_ids(tokenizer, MESSAGES)
        status, decoded = await post(session, url + "/v1/detokenize", {"tokens": chat["tokens"]})
        assert status == 200
        assert decoded == {"prompt": tokenizer.decode(chat["tokens"], skip_special_tokens=False)}
        assert "<|im_start|>" in decoded["prompt"]  # vLLM keeps special tokens; SGLang's route skips them
        _, sglang = await post(session, url + "/detokenize", {"tokens": chat["tokens"]})
        assert sglang == {"text": tokenizer.decode(chat["tokens"])}


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/tokenize", {"model": "other", "prompt": "x"}, 404, "model"),
        (
            "/v1/tokenize",
            {"messages": MESSAGES, "add_generation_prompt": False},
            400,
            "add_generation_prompt",
        ),
        ("/v1/tokenize", {"messages": "hi"}, 400, "messages"),
        ("/v1/tokenize", {}, 400, "prompt"),
        ("/v1/detokenize", {"tokens": [[1, 2]]}, 400, "tokens"),
        ("/v1/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/v1/detokenize", {"tokens": "1 2"}, 400, "tokens"),
    ],
)
async def test_bad_tokenize_requests_are_openai_errors(
    engine_server: EngineServer, path: str, body: dict, status: int, param: str
) -> None:
    async with aiohttp.ClientSession() as session:
        got, answer = await post(session, engine_server.url + path, body)
    assert got == status and answer["error"]["param"] == param


async def test_kv_pin_holds_the_prompt_and_metrics_show_it(engine_server: EngineServer) -> None:
    registry = engine_server.state.metrics.registry
    prompt = list(range(1000, 1000 + 16 * 3 + 5))
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "kv_pin": {"ttl_s": 600}}
    async with aiohttp.ClientSession() as session:
        status, _ = await post(session, engine_server.url + "/v1/completions", body)
        assert status == 200
        engine_server.wait_idle()
        assert registry.get_sample_value("prefixgate_engine_kv_pages_pinned") == 3
        assert registry.get_sample_value("prefixgate_engine_kv_pins") == 1
        async with session.post(engine_server.url + "/flush_cache") as flushed:  # releases the pins
            assert flushed.status == 200
    engine_server.wait_idle()
    assert registry.get_sample_value("prefixgate_engine_kv_pins") == 0
