"""Prefill/decode disaggregation between two real engine servers (Mooncake over TCP on loopback):
P prefills with ``kv_transfer_params.do_remote_decode`` and answers where its KV is; D, given those
parameters (vLLM's ``do_remote_prefill``), pulls the prompt's pages and decodes. The output must be
token-identical to one engine doing both, and nothing may stay allocated on either side."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

pytest.importorskip("mooncake.engine", reason="KV transfer needs mooncake-transfer-engine-non-cuda")

from tests.engine.kv_transfer_helpers import (
    GatedTransport,
    Server,
    held,
    http,
    metric,
    new_prompt,
    nothing_held,
    pages_leaked,
    server_pair,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pd(smollm2_gguf_path: Path, smollm2_model) -> Iterator[tuple[Server, Server]]:
    with server_pair(str(smollm2_gguf_path), smollm2_model, ("prefill", "decode")) as pair:
        yield pair


def complete(url: str, prompt: list[int], max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return http("POST", f"{url}/v1/completions", body)


def prefill(p: Server, prompt: list[int], **extra: Any) -> dict[str, Any]:
    """What a gateway sends P: one token, no stream, ``do_remote_decode``."""
    reply = complete(p.url, prompt, 1, kv_transfer_params={"do_remote_decode": True}, **extra)
    return reply["kv_transfer_params"]


def test_roles_are_advertised(pd: tuple[Server, Server]) -> None:
    p, d = pd
    assert http("GET", f"{p.url}/get_server_info")["disaggregation_mode"] == "prefill"
    assert http("GET", f"{d.url}/get_server_info")["disaggregation_mode"] == "decode"


def test_decode_side_output_equals_one_engine_doing_both(pd: tuple[Server, Server]) -> None:
    p, d = pd
    prompt = new_prompt(300)
    params = prefill(p, prompt)
    assert params["do_remote_prefill"] is True
    assert params["remote_port"] == int(p.url.rsplit(":", 1)[1])
    assert len(params["remote_block_ids"]) == (len(prompt) - 1) // 16
    fetched_before = metric(d.url, "kv_fetched_tokens_total")
    out = complete(d.url, prompt, kv_transfer_params=params)
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == (len(prompt) - 1) // 16 * 16
    assert metric(d.url, "kv_fetched_tokens_total") - fetched_before == (len(prompt) - 1) // 16 * 16
    mixed = complete(p.url, prompt)  # the same greedy request, prefilled and decoded by one engine
    assert out["choices"][0]["text"] == mixed["choices"][0]["text"]
    wait_until(lambda: nothing_held(p, d), "leases and import regions freed")
    assert not pages_leaked(p) and not pages_leaked(d)


def test_decode_side_pulls_only_what_it_lacks(pd: tuple[Server, Server]) -> None:
    p, d = pd
    shared = new_prompt(160)
    complete(d.url, shared)  # D already holds the first 160 tokens' pages
    prompt = shared + new_prompt(200)[1:]
    params = prefill(p, prompt)
    fetched_before = metric(d.url, "kv_fetched_tokens_total")
    out = complete(d.url, prompt, kv_transfer_params=params)
    fetched = metric(d.url, "kv_fetched_tokens_total") - fetched_before
    assert fetched == (len(prompt) - 1) // 16 * 16 - 160
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == (len(prompt) - 1) // 16 * 16


def test_tenant_namespaces_never_cross(pd: tuple[Server, Server]) -> None:
    p, d = pd
    prompt = new_prompt(200)
    params = prefill(p, prompt, cache_salt="tenant-a")
    failed_before = metric(d.url, 'kv_fetches_total{outcome="plan_mismatch"}')
    out = complete(d.url, prompt, kv_transfer_params=params, cache_salt="tenant-b")
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # recomputed, never borrowed
    assert metric(d.url, 'kv_fetches_total{outcome="plan_mismatch"}') == failed_before + 1
    same = complete(d.url, prompt, kv_transfer_params=params, cache_salt="tenant-a")
    assert same["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert same["choices"][0]["text"] == out["choices"][0]["text"]


def test_prefill_side_gone_means_recomputing(pd: tuple[Server, Server]) -> None:
    _, d = pd
    prompt = new_prompt(200)
    params = {
        "do_remote_prefill": True,
        "remote_host": "127.0.0.1",
        "remote_port": 9,  # nothing listens there
        "remote_block_ids": [1, 2, 3],
        "expires_at_ms": 2**62,
    }
    out = complete(d.url, prompt, kv_transfer_params=params)
    assert out["choices"][0]["finish_reason"] in ("length", "stop")
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert not pages_leaked(d)


def test_client_cancel_mid_transfer_frees_both_sides(pd: tuple[Server, Server]) -> None:
    p, d = pd
    gate = d.state.transfer.transport
    assert isinstance(gate, GatedTransport)
    prompt = new_prompt(300)
    params = prefill(p, prompt)

    async def cancelled_request() -> None:
        body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "kv_transfer_params": params}
        async with aiohttp.ClientSession() as session:
            task = asyncio.ensure_future(session.post(f"{d.url}/v1/completions", json=body))
            await asyncio.to_thread(gate.reading.wait, 30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    with held(gate):
        asyncio.run(cancelled_request())
    wait_until(lambda: nothing_held(p, d), "leases and import regions freed after the cancel")
    wait_until(lambda: not pages_leaked(p) and not pages_leaked(d), "no page left allocated")


@pytest.mark.parametrize(
    "params",
    [
        "yes",
        {"do_remote_prefill": True, "do_remote_decode": True},
        {"do_remote_prefill": True, "remote_host": "a/b", "remote_port": 1, "remote_block_ids": [1]},
        {"do_remote_prefill": True, "remote_host": "h", "remote_port": 0, "remote_block_ids": [1]},
        {"do_remote_prefill": True, "remote_host": "h", "remote_port": 80, "remote_block_ids": "x"},
        {"do_remote_prefill": True, "remote_host": "h", "remote_port": 80, "remote_block_ids": [-1]},
        {"do_remote_prefill": "true"},
    ],
)
def test_malformed_transfer_params_are_400(pd: tuple[Server, Server], params: Any) -> None:
    _, d = pd
    body = {"prompt": "hello", "max_tokens": 1, "kv_transfer_params": params}

    async def go() -> tuple[int, dict]:
        async with aiohttp.ClientSession() as s, s.post(f"{d.url}/v1/completions", json=body) as r:
            return r.status, await r.json()

    status, reply = asyncio.run(go())
    assert status == 400
    assert reply["error"]["param"] == "kv_transfer_params"
