"""KV transfer between two real engine servers on loopback (Mooncake over TCP), sharing one model.

A holds prefixes; B carries out fetch plans that point at A. Every test checks the output against
recomputing (A's own greedy output), and that no export lease or import region is left behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

pytest.importorskip("mooncake.engine", reason="KV transfer needs mooncake-transfer-engine-non-cuda")

from tests.engine.kv_transfer_helpers import (
    GatedTransport,
    Server,
    generate,
    held,
    http,
    metric,
    new_prompt,
    nothing_held,
    pages_leaked,
    plan_for,
    server_pair,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def servers(smollm2_gguf_path: Path, smollm2_model) -> Iterator[tuple[Server, Server]]:
    with server_pair(str(smollm2_gguf_path), smollm2_model) as pair:
        yield pair


def transport(server: Server) -> GatedTransport:
    service = server.state.transfer
    assert service is not None and isinstance(service.transport, GatedTransport)
    return service.transport


def test_fetched_kv_gives_the_same_tokens_as_recomputing(servers: tuple[Server, Server]) -> None:
    a, b = servers
    prompt = new_prompt(300)
    reference = generate(a.url, prompt)  # computed on A, which now caches its prefix
    fetched_before = metric(b.url, "kv_fetched_tokens_total")
    plan = plan_for(a, prompt)
    out = generate(b.url, prompt, plan)
    assert out["output_ids"] == reference["output_ids"]
    fetched = metric(b.url, "kv_fetched_tokens_total") - fetched_before
    assert fetched == (len(prompt) - 1) // 16 * 16  # every whole page but a last token's
    assert out["meta_info"]["cached_tokens"] == fetched  # B computed only what was not fetched
    # The fetched blocks are B's own now, named as B names them, and serve the next request too.
    assert set(plan["block_hashes"][: int(fetched) // 16]) <= set(_tree_hashes(b))
    again = generate(b.url, prompt)
    assert again["output_ids"] == reference["output_ids"]
    assert again["meta_info"]["cached_tokens"] >= fetched
    wait_until(lambda: nothing_held(a, b), "leases and import regions freed")
    assert not pages_leaked(a) and not pages_leaked(b)


def _tree_hashes(server: Server) -> list[int]:
    async def read() -> list[int]:
        return await server.state.engine.call(
            lambda engine: [h for node in engine.cache.nodes() for h in node.hashes]
        )

    return asyncio.run_coroutine_threadsafe(read(), server.state.engine._loop).result(30)  # type: ignore[arg-type]


def _failure_case(servers: tuple[Server, Server], reason: str, prompt: list[int], plan: dict) -> None:
    """The request with ``plan`` recomputes, gives A's tokens, and the failure is counted."""
    a, b = servers
    reference = generate(a.url, prompt) if reason != "source_missing" else None
    before = metric(b.url, f'kv_fetches_total{{outcome="{reason}"}}')
    fetched_before = metric(b.url, "kv_fetched_tokens_total")
    out = generate(b.url, prompt, plan)
    if reference is not None:
        assert out["output_ids"] == reference["output_ids"]
    assert out["meta_info"]["cached_tokens"] == 0  # nothing fetched: all recomputed
    assert metric(b.url, f'kv_fetches_total{{outcome="{reason}"}}') == before + 1
    assert metric(b.url, "kv_fetched_tokens_total") == fetched_before
    wait_until(lambda: nothing_held(a, b), "leases and import regions freed")
    assert not pages_leaked(a) and not pages_leaked(b)


def test_an_expired_plan_recomputes(servers: tuple[Server, Server]) -> None:
    a, _ = servers
    prompt = new_prompt()
    generate(a.url, prompt)
    _failure_case(servers, "expired", prompt, plan_for(a, prompt, expires_at_ms=1))


def test_blocks_the_source_evicted_are_recomputed(servers: tuple[Server, Server]) -> None:
    a, _ = servers
    prompt = new_prompt()
    generate(a.url, prompt)
    plan = plan_for(a, prompt)
    http("POST", f"{a.url}/flush_cache")
    assert http("GET", f"{a.url}/kv_transfer/info")["export_leases"] == 0
    _failure_case(servers, "source_missing", prompt, plan)


def test_a_dead_source_is_recomputed(servers: tuple[Server, Server]) -> None:
    a, _ = servers
    prompt = new_prompt()
    generate(a.url, prompt)
    plan = plan_for(a, prompt, source_endpoint="http://127.0.0.1:9")  # discard port: nobody listens
    _failure_case(servers, "source_unreachable", prompt, plan)


def test_a_corrupt_page_is_recomputed(servers: tuple[Server, Server]) -> None:
    a, b = servers
    prompt = new_prompt()
    generate(a.url, prompt)
    transport(b).corrupt = True
    try:
        _failure_case(servers, "checksum", prompt, plan_for(a, prompt))
    finally:
        transport(b).corrupt = False


def test_a_fetch_past_its_timeout_is_recomputed(servers: tuple[Server, Server]) -> None:
    a, b = servers
    prompt = new_prompt()
    generate(a.url, prompt)
    fetcher = b.state.transfer.fetcher  # type: ignore[union-attr]
    timeout, fetcher.timeout_s = fetcher.timeout_s, 1.0
    try:
        with held(transport(b)):  # the read never returns before the fetch gives up
            _failure_case_held(servers, "timeout", prompt, plan_for(a, prompt))
    finally:
        fetcher.timeout_s = timeout
    wait_until(lambda: nothing_held(a, b), "the late read's region and the source's lease freed")


def _failure_case_held(servers: tuple[Server, Server], reason: str, prompt: list[int], plan: dict) -> None:
    a, b = servers
    reference = generate(a.url, prompt)
    before = metric(b.url, f'kv_fetches_total{{outcome="{reason}"}}')
    out = generate(b.url, prompt, plan)
    assert out["output_ids"] == reference["output_ids"]
    assert out["meta_info"]["cached_tokens"] == 0
    assert metric(b.url, f'kv_fetches_total{{outcome="{reason}"}}') == before + 1
    assert metric(b.url, "kv_fetch_recomputed_tokens_total") > 0


def test_a_salted_prefix_is_never_fetched_into_another_salt(servers: tuple[Server, Server]) -> None:
    a, b = servers
    prompt = new_prompt()
    generate(a.url, prompt, salt="tenant-a")
    plan_a = plan_for(a, prompt, salt="tenant-a")
    # The plan names tenant-a's namespace, the request is tenant-b's: refused before any traffic.
    out = generate(b.url, prompt, plan_a, salt="tenant-b")
    assert out["meta_info"]["cached_tokens"] == 0
    # A plan that claims tenant-b's namespace for tenant-a's blocks: its hashes are not this
    # prompt's in tenant-b's namespace (the chain's root is the salt), so it is refused too.
    forged = {**plan_a, "namespace": "tenant-b"}
    http("POST", f"{b.url}/flush_cache")  # forget what the first request computed under tenant-b
    before = metric(b.url, 'kv_fetches_total{outcome="plan_mismatch"}')
    out = generate(b.url, prompt, forged, salt="tenant-b")
    assert out["meta_info"]["cached_tokens"] == 0
    assert metric(b.url, 'kv_fetches_total{outcome="plan_mismatch"}') == before + 1
    assert metric(b.url, 'kv_fetches_total{outcome="cross_namespace"}') >= 1
    # And the source looks a chain up in the namespace asked for only.
    layout = http("GET", f"{a.url}/kv_transfer/info")["layout"]
    ask = {
        "version": 1,
        "plan_id": "forged",
        "namespace": "tenant-b",
        "block_hashes": plan_a["block_hashes"],
        "first_block": 0,
        "layout": layout,
    }
    refused = http("POST", f"{a.url}/kv_transfer/export", ask)
    assert refused["error"]["code"] == "blocks_missing"
    wait_until(lambda: nothing_held(a, b), "nothing held")


def test_a_cancelled_request_frees_what_its_fetch_held_on_both_sides(servers: tuple[Server, Server]) -> None:
    a, b = servers
    prompt = new_prompt()
    generate(a.url, prompt)
    gated = transport(b)

    async def request_then_go_away() -> None:
        body = {
            "input_ids": prompt,
            "sampling_params": {"max_new_tokens": 8, "temperature": 0},
            "kv_fetch_plan": plan_for(a, prompt),
        }
        async with aiohttp.ClientSession() as session:
            post = asyncio.ensure_future(session.post(f"{b.url}/generate", json=body))
            await asyncio.to_thread(gated.reading.wait, 60)  # mid-transfer: A leased, B reserved
            assert not await asyncio.to_thread(nothing_held, a, b)
            post.cancel()  # the client goes away
            with pytest.raises(asyncio.CancelledError):
                await post

    with held(gated):
        asyncio.run(request_then_go_away())
    wait_until(lambda: nothing_held(a, b), "A's lease and B's import region freed after the cancel")
    wait_until(lambda: not pages_leaked(b), "no KV page left outside the tree and the free list")
    assert generate(b.url, prompt)["output_ids"] == generate(a.url, prompt)["output_ids"]


def test_a_busy_import_buffer_falls_back_at_once(servers: tuple[Server, Server]) -> None:
    a, b = servers
    service = b.state.transfer
    assert service is not None
    prompt = new_prompt()
    generate(a.url, prompt)
    region = service.import_buffer.reserve(service.import_buffer.num_bytes)  # all of it taken
    assert region is not None
    try:
        _failure_case_held(servers, "busy", prompt, plan_for(a, prompt))
    finally:
        b.state.engine._loop.call_soon_threadsafe(service.import_buffer.free, region)  # type: ignore[union-attr]
    wait_until(lambda: nothing_held(a, b), "nothing held")
