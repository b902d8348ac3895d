"""Retention and the tokenizer routes through a gateway in front of a real engine worker: a Messages
breakpoint and a chat's ``prompt_cache_retention`` end as pins in the engine's prefix cache, and the
tokenizer routes pass through to the engine, which answers them itself."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest

from cache.prompt.chat import chat_prompt_ids
from cache.prompt.tokenizer import Tokenizer
from engine.config import EngineConfig
from gateway.config import GatewayConfig, RoutingConfig
from gateway.retention import common_prefix
from tests.engine.server.conftest import EngineServer, serve_engine
from tests.gateway.conftest import running_gateway
from tests.gateway.test_routing_e2e import system_prompt

pytestmark = pytest.mark.slow  # a real engine worker


@pytest.fixture(scope="module")
def engine_worker(smollm2_gguf_path: Path, smollm2_model) -> Iterator[EngineServer]:
    config = EngineConfig(model=str(smollm2_gguf_path), dtype="float32", kv_cache_tokens=2048)
    with serve_engine(config, smollm2_model) as server:
        yield server


def gateway_config(worker: EngineServer) -> GatewayConfig:
    return GatewayConfig(
        workers=(worker.url,), routing=RoutingConfig(), health_interval_s=3600, ingest_kv_events=False
    )


async def test_breakpoints_and_retention_pin_prefixes_in_the_engine(
    engine_worker: EngineServer, tokenizer: Tokenizer
) -> None:
    pins = engine_worker.engine.pins
    system = system_prompt("lighthouse", words=60)
    async with running_gateway(gateway_config(engine_worker), tokenizer) as (base, _):
        claude = anthropic.AsyncAnthropic(base_url=base, api_key="unused", max_retries=0)
        await claude.messages.create(
            model=engine_worker.model_id,
            max_tokens=1,
            system=[{"type": "text", "text": system, "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
            messages=[{"role": "user", "content": "One word?"}],
        )
        engine_worker.wait_idle()
        rendered = [{"role": "system", "content": system}, {"role": "user", "content": "One word?"}]
        prompt = chat_prompt_ids(tokenizer, rendered)
        system_tokens = common_prefix(chat_prompt_ids(tokenizer, rendered[:1]), prompt)
        assert len(pins) == 1 and pins.pinned_pages == system_tokens // 16 > 0

        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        await client.chat.completions.create(
            model=engine_worker.model_id,
            messages=[{"role": "user", "content": system_prompt("harbour", words=40)}],
            max_tokens=1,
            prompt_cache_retention="24h",
        )
        engine_worker.wait_idle()
        assert len(pins) == 2
        async with (  # on the engine's thread: releases the pins
            aiohttp.ClientSession() as session,
            session.post(f"{engine_worker.url}/flush_cache") as flushed,
        ):
            assert flushed.status == 200


async def test_tokenizer_routes_pass_through_to_the_engine(
    engine_worker: EngineServer, tokenizer: Tokenizer
) -> None:
    messages = [{"role": "user", "content": "Hello there"}]
    async with (
        running_gateway(gateway_config(engine_worker), tokenizer) as (base, _),
        aiohttp.ClientSession() as session,
    ):
        async with session.post(f"{base}/v1/tokenize", json={"messages": messages}) as answer:
            assert answer.status == 200
            tokenized = await answer.json()
        assert tokenized["tokens"] == chat_prompt_ids(tokenizer, messages)
        assert tokenized["count"] == len(tokenized["tokens"])
        async with session.post(f"{base}/v1/detokenize", json={"tokens": tokenized["tokens"]}) as answer:
            assert (await answer.json())["prompt"] == tokenizer.decode(
                tokenized["tokens"], skip_special_tokens=False
            )
        async with session.post(f"{base}/tokenize", json={"prompt": ["a b", "c"]}) as answer:
            assert (await answer.json())["count"] == [len(tokenizer.encode(t, True)) for t in ("a b", "c")]
        async with session.post(f"{base}/detokenize", json={"tokens": [[tokenized["tokens"][1]]]}) as answer:
            assert len((await answer.json())["text"]) == 1
        async with session.post(f"{base}/v1/tokenize", json={"model": "nope", "prompt": "x"}) as answer:
            assert answer.status == 404
            assert (await answer.json())["error"]["code"] == "model_not_found"
