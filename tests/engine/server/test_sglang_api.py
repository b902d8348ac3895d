"""SGLang-native endpoints: /generate, info, load, health, flush, tokenize, metrics."""

from __future__ import annotations

import itertools
import json

import aiohttp
import pytest

from cache.wire.hashing import HASH_SCHEME
from tests.engine.server.conftest import EngineServer

pytestmark = pytest.mark.slow  # every test here talks to a worker serving the real model


async def get(session: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
    resp = await session.get(url)
    await resp.read()
    return resp


async def test_generate_text_and_input_ids(engine_server: EngineServer) -> None:
    tokenizer = engine_server.engine.tokenizer
    params = {"max_new_tokens": 4, "temperature": 0}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            engine_server.url + "/generate", json={"text": "The sky is", "sampling_params": params}
        ) as r:
            out = await r.json()
        ids = tokenizer.encode("The sky is", add_special_tokens=True)
        async with session.post(
            engine_server.url + "/generate", json={"input_ids": ids, "sampling_params": params}
        ) as r:
            by_ids = await r.json()
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 4}
    assert meta["prompt_tokens"] == len(ids) and meta["completion_tokens"] == len(out["output_ids"]) == 4
    assert out["text"] == tokenizer.decode(out["output_ids"])
    assert by_ids["output_ids"] == out["output_ids"] and by_ids["meta_info"]["cached_tokens"] >= 0


async def test_generate_stream_is_cumulative(engine_server: EngineServer) -> None:
    body = {
        "text": "Roses are red,",
        "stream": True,
        "sampling_params": {"max_new_tokens": 5, "temperature": 0},
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(engine_server.url + "/generate", json=body) as resp,
    ):
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        lines = [line.strip() for line in (await resp.text()).split("\n\n") if line.strip()]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    for earlier, later in itertools.pairwise(chunks):
        assert later["text"].startswith(earlier["text"])
        assert later["output_ids"][: len(earlier["output_ids"])] == earlier["output_ids"]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] in ("length", "stop")


async def test_info_load_health_endpoints(engine_server: EngineServer) -> None:
    url = engine_server.url
    async with aiohttp.ClientSession() as session:
        for path in ("/health", "/health_generate"):
            assert (await get(session, url + path)).status == 200
        for path in ("/get_server_info", "/server_info"):
            info = await (await session.get(url + path)).json()
            assert info["served_model_name"] == engine_server.model_id and info["page_size"] == 16
            assert info["kv_block_hash"] == HASH_SCHEME  # what lets a gateway trust its KV events
            assert info["internal_states"][0]["num_reqs"] >= 0
        for path in ("/get_model_info", "/model_info"):
            model = await (await session.get(url + path)).json()
            assert model["is_generation"] is True and model["model_path"].endswith(".gguf")
            assert model["architectures"] == ["LlamaForCausalLM"]
        load = await (await session.get(url + "/get_load")).json()
        assert load[0]["dp_rank"] == 0 and {"num_reqs", "num_waiting_reqs", "num_tokens"} <= set(load[0])


async def test_tokenize_detokenize_round_trip(engine_server: EngineServer) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(engine_server.url + "/tokenize", json={"prompt": "Hello world"}) as r:
            tok = await r.json()
        assert (
            tok["count"] == len(tok["tokens"]) > 0
            and tok["max_model_len"] == engine_server.engine.info.max_model_len
        )
        assert tok["tokens"] == engine_server.engine.tokenizer.encode("Hello world", add_special_tokens=True)
        async with session.post(engine_server.url + "/detokenize", json={"tokens": tok["tokens"]}) as r:
            assert (await r.json())["text"] == "Hello world"
        async with session.post(engine_server.url + "/v1/tokenize", json={"prompt": ["a", "bc"]}) as r:
            assert len((await r.json())["tokens"]) == 2


async def test_flush_cache_empties_the_tree(engine_server: EngineServer) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(engine_server.url + "/generate", json={"text": "x " * 40}) as r:
            assert r.status == 200
        engine_server.wait_idle()
        assert engine_server.engine.cache.num_pages > 0
        assert (await get(session, engine_server.url + "/flush_cache")).status == 200
    assert engine_server.engine.cache.num_pages == 0 and engine_server.engine.pool.num_used == 0


async def test_metrics_count_tokens(engine_server: EngineServer) -> None:
    prefix = "prefixgate_engine_"
    registry = engine_server.state.metrics.registry
    generated = registry.get_sample_value(prefix + "generation_tokens_total") or 0.0
    async with aiohttp.ClientSession() as session:
        async with session.post(
            engine_server.url + "/generate",
            json={"text": "Hi", "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}},
        ) as r:
            assert r.status == 200
        async with session.get(engine_server.url + "/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    for name in (
        "requests_total",
        "prompt_tokens_total",
        "cached_prompt_tokens_total",
        "generation_tokens_total",
        "time_to_first_token_seconds_bucket",
        "inter_token_latency_seconds_bucket",
        "num_running_requests",
        "num_waiting_requests",
        "kv_pages_used",
        "kv_pages_free",
    ):
        assert prefix + name in text
    assert registry.get_sample_value(prefix + "generation_tokens_total") == generated + 3
