"""Prefill/decode disaggregation through the gateway: real embedded engines in their roles (KV moved
over Mooncake), a prefill worker that fails, and a stand-in SGLang PD pair (two processes speaking
SGLang's bootstrap fields: real SGLang cannot run here) driven the way SGLang's router drives one."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from cache.prompt.tokenizer import Tokenizer
from gateway.config import GatewayConfig, RoutingConfig
from gateway.launcher import engine_workers, free_ports, spawn, stop_processes, wait_healthy
from tests.gateway.conftest import ENGINE_ARGS, running_gateway

pytestmark = pytest.mark.slow  # starts worker processes

# float32: a prompt whose KV was moved must decode exactly as one computed in place
PD_ARGS = [*ENGINE_ARGS, "--dtype", "float32"]
LONG = "Read this carefully. " + " ".join(
    f"Clause {i} says the sky is {i % 7} shades of blue." for i in range(50)
)


@pytest.fixture(scope="module")
def pd_workers() -> Iterator[tuple[str, str]]:
    pytest.importorskip("mooncake.engine", reason="KV transfer needs mooncake-transfer-engine-non-cuda")
    with (
        engine_workers(1, None, [*PD_ARGS, "--role", "prefill"], timeout=300) as prefill,
        engine_workers(1, None, [*PD_ARGS, "--role", "decode"], timeout=300) as decode,
    ):
        yield prefill[0].url, decode[0].url


def pd_config(prefill: list[str], decode: list[str], **routing: Any) -> GatewayConfig:
    return GatewayConfig(
        prefill_workers=tuple(prefill),
        decode_workers=tuple(decode),
        routing=RoutingConfig(**routing),
        health_interval_s=0.5,
    )


async def chat(url: str, content: str, stream: bool = False, **extra: Any) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0, **extra}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        if not stream:
            return await r.json()
        text, usage = [], None
        async for line in r.content:
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                text += [c["delta"].get("content") or "" for c in chunk["choices"]]
        return {"text": "".join(text), "usage": usage}


async def metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(f"prefixgate_engine_{name} "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/stats") as r:
        return await r.json()


def test_long_prompt_is_prefilled_remotely_and_decodes_like_one_engine(
    pd_workers: tuple[str, str], tokenizer: Tokenizer
) -> None:
    prefill, decode = pd_workers

    async def go() -> None:
        async with running_gateway(pd_config([prefill], [decode]), tokenizer) as (url, _):
            fetched = await metric(decode, "kv_fetched_tokens_total")
            out = await chat(url, LONG, stream=True)
            moved = await metric(decode, "kv_fetched_tokens_total") - fetched
            assert moved > 256  # the prompt's KV came from the prefill worker
            assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == moved
            assert (await stats(url))["totals"]["pd_paths"] == {"remote": 1}
            mixed = await chat(prefill, LONG)  # the same greedy request, one engine doing both
            assert out["text"] == mixed["choices"][0]["message"]["content"]

    asyncio.run(go())


def test_short_uncached_part_is_prefilled_by_the_decode_worker(
    pd_workers: tuple[str, str], tokenizer: Tokenizer
) -> None:
    prefill, decode = pd_workers

    async def go() -> None:
        async with running_gateway(pd_config([prefill], [decode]), tokenizer) as (url, _):
            served = await metric(prefill, "prompt_tokens_total")
            await chat(url, "Say hi.")
            assert (await stats(url))["totals"]["pd_paths"] == {"local": 1}
            assert await metric(prefill, "prompt_tokens_total") == served

    asyncio.run(go())


def test_a_failing_prefill_worker_costs_nothing_but_the_fallback(
    pd_workers: tuple[str, str], tokenizer: Tokenizer
) -> None:
    _, decode = pd_workers

    async def go() -> None:
        broken = web.Application()

        async def info(_: web.Request) -> web.Response:
            return web.json_response({"disaggregation_mode": "prefill", "kv_block_hash": "prefixgate/x"})

        async def fail(_: web.Request) -> web.Response:
            return web.Response(status=500, text="boom")

        broken.router.add_get("/get_server_info", info)
        broken.router.add_get("/health", lambda _: web.Response())
        broken.router.add_post("/v1/chat/completions", fail)
        runner = web.AppRunner(broken)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            config = pd_config([f"http://127.0.0.1:{port}"], [decode])
            async with running_gateway(config, tokenizer) as (url, _):
                out = await chat(url, LONG + " fallback")
                assert out["choices"][0]["message"]["content"]
                assert (await stats(url))["totals"]["pd_paths"] == {"fallback": 1}
        finally:
            await runner.cleanup()

    asyncio.run(go())


@pytest.fixture(scope="module")
def sglang_pd_pair() -> Iterator[tuple[str, str]]:
    ports = free_ports(3)
    common = ["--model-path", "standin-model", "--host", "127.0.0.1", "--page-size", "16"]
    commands = [
        [*common, "--port", str(ports[0]), "--disaggregation-mode", "prefill"],
        [*common, "--port", str(ports[1]), "--disaggregation-mode", "decode"],
    ]
    commands[0] += ["--disaggregation-bootstrap-port", str(ports[2])]
    procs = [spawn([sys.executable, "-m", "tests.gateway.sglang_standin", *c]) for c in commands]
    urls = [f"http://127.0.0.1:{p}" for p in ports[:2]]
    try:
        for proc, url in zip(procs, urls, strict=True):
            wait_healthy(proc, url, time.monotonic() + 120, 120, None)
        yield urls[0], urls[1]
    finally:
        stop_processes(procs)


def test_gateway_drives_an_sglang_pd_pair_with_bootstrap_fields(
    sglang_pd_pair: tuple[str, str], tokenizer: Tokenizer
) -> None:
    prefill, decode = sglang_pd_pair

    async def go() -> None:
        async with running_gateway(pd_config([prefill], [decode]), tokenizer) as (url, _):
            out = await chat(url, LONG, stream=True)
            async with aiohttp.ClientSession() as s:
                p_seen = (await (await s.get(f"{prefill}/standin/cache")).json())["rooms"]
                d_seen = (await (await s.get(f"{decode}/standin/cache")).json())["rooms"]
            assert len(p_seen) == len(d_seen) == 1 and p_seen == d_seen  # one room, sent to both
            room = d_seen[0]
            assert room["bootstrap_host"] == "127.0.0.1"
            async with aiohttp.ClientSession() as s:
                info = await (await s.get(f"{prefill}/get_server_info")).json()
            assert room["bootstrap_port"] == info["disaggregation_bootstrap_port"]
            assert out["text"].startswith("prefilled ")  # the decode side's stream, fed by that prefill
            assert (await stats(url))["totals"]["pd_paths"] == {"remote": 1}

    asyncio.run(go())
