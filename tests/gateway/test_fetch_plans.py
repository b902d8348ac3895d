"""Fetch plans (gateway/fetch_plans.py): when the chosen worker lacks a prefix a peer holds, the gateway
names the peer as the source of the blocks, if moving them pays; client-sent plans never reach a worker.

Pure decisions first, then the router's hook against a real index, then the whole gateway against stub
workers on loopback (the body each worker receives). The end-to-end test with real engines is
test_fetch_plans_e2e.py."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cache.api.kv_fields import MAX_FETCH_PLAN_BLOCKS
from cache.api.requests import chat_prompt_ids
from cache.index.ops import StoredOp
from cache.index.radix_index import MatchResult
from cache.index.store import LocalIndexStore
from cache.prompt.tokenizer import Tokenizer
from cache.wire.hashing import HASH_SCHEME, block_hashes, namespace_seed
from gateway.config import GatewayConfig, RoutingConfig, Tenant
from gateway.fetch_plans import plan_fetch
from gateway.metrics import GatewayMetrics
from gateway.router import PreparedRequest, Router
from gateway.shared_state import LocalSharedState
from gateway.state import STATE, GatewayState
from gateway.workers import Worker, WorkerPool, _kv_layout
from tests.gateway.conftest import running_gateway
from tests.gateway.test_dispatch import CHAT, StubWorker

MODEL = "m"
LAYOUT = (("dtype", "float32"), ("layers", 30), ("model_id", MODEL), ("page_size", 16))
PROMPT = list(range(1000, 1700))  # 700 tokens: 43 whole blocks, the last token in block 44


def worker(name: str, layout: Any = LAYOUT, healthy: bool = True, load: int = 0) -> Worker:
    w = Worker(url=f"http://127.0.0.1:{9000 + ord(name[0])}", worker_id=name, kind="prefixgate")
    w.model_id, w.kv_layout, w.healthy, w.external_load = MODEL, layout, healthy, load
    return w


def held(**blocks: int) -> dict[str, MatchResult]:
    return {name: MatchResult(n, n, 0) for name, n in blocks.items()}


def decide(target: Worker, workers: list[Worker], matches: dict, *, salt: str = "", **overrides: Any):
    hashes = block_hashes(PROMPT, 16, seed=namespace_seed(MODEL, salt))
    kwargs: dict[str, Any] = {
        "prompt_tokens": len(PROMPT),
        "namespace": salt,
        "exclude": (),
        "min_tokens": 256,
        "plan_id": "plan-1",
        "expires_at_ms": 1234,
    }
    return plan_fetch(target, workers, matches, hashes, **{**kwargs, **overrides})


# -- the decision ---------------------------------------------------------------------------------------
def test_a_plan_names_the_holder_and_the_blocks_the_target_lacks() -> None:
    a, b = worker("a"), worker("b")
    outcome, fetch = decide(b, [a, b], held(a=40, b=5), salt="tenant-salt")
    assert outcome == "attached" and fetch is not None
    assert (fetch.source, fetch.tokens) == ("a", 35 * 16)
    plan = fetch.plan
    assert plan.source_endpoint == a.url and plan.plan_id == "plan-1" and plan.expires_at_ms == 1234
    assert plan.namespace == "tenant-salt"
    assert list(plan.block_hashes) == block_hashes(PROMPT, 16, seed=namespace_seed(MODEL, "tenant-salt"))[:40]
    assert plan.planned_prefix_blocks == 40
    body = fetch.to_json()  # docs/kv-transfer.md's fields, and nothing else
    assert set(body) == {
        "plan_id",
        "source_endpoint",
        "block_hashes",
        "planned_prefix_blocks",
        "expires_at_ms",
        "namespace",
    }
    assert body["block_hashes"] == list(plan.block_hashes)


def test_the_longest_usable_holder_is_the_source() -> None:
    a, b, c = worker("a"), worker("b"), worker("c")
    assert decide(b, [a, b, c], held(a=20, c=43))[1].source == "c"  # type: ignore[union-attr]
    c.healthy = False  # the longest holder is down: the next one still pays
    assert decide(b, [a, b, c], held(a=20, c=43))[1].source == "a"  # type: ignore[union-attr]


def test_no_plan_when_moving_does_not_pay() -> None:
    a, b = worker("a"), worker("b")
    assert decide(b, [a, b], held(a=10)) == ("below_min", None)  # 160 tokens < 256
    assert decide(b, [a, b], held(a=40, b=30)) == ("below_min", None)  # b lacks only 10 blocks
    assert decide(b, [a, b], held(a=10), min_tokens=160)[0] == "attached"


def test_nothing_to_decide_when_no_peer_holds_more() -> None:
    a, b = worker("a"), worker("b")
    assert decide(b, [a, b], held(a=20, b=20)) == (None, None)
    assert decide(b, [a, b], held(b=20)) == (None, None)
    assert decide(b, [a, b], {}) == (None, None)


def test_never_the_last_tokens_page_nor_more_than_a_plan_may_name() -> None:
    a, b = worker("a"), worker("b")
    exact = list(range(1000, 1000 + 32 * 16))  # 32 whole blocks: the 32nd holds the last token
    hashes = block_hashes(exact, 16, seed=namespace_seed(MODEL))
    common: dict[str, Any] = {"namespace": "", "exclude": (), "plan_id": "p", "expires_at_ms": 1}
    _, fetch = plan_fetch(b, [a, b], held(a=32), hashes, prompt_tokens=len(exact), min_tokens=1, **common)
    assert fetch is not None and fetch.plan.planned_prefix_blocks == 31
    huge = [1000 + i % 5000 for i in range((MAX_FETCH_PLAN_BLOCKS + 10) * 16)]
    hashes = block_hashes(huge, 16, seed=namespace_seed(MODEL))
    matches = held(a=MAX_FETCH_PLAN_BLOCKS + 10)
    _, fetch = plan_fetch(b, [a, b], matches, hashes, prompt_tokens=len(huge), min_tokens=1, **common)
    assert fetch is not None and len(fetch.plan.block_hashes) == MAX_FETCH_PLAN_BLOCKS


def test_workers_without_kv_transfer_or_with_another_layout_exchange_nothing() -> None:
    a, b = worker("a"), worker("b")
    other = tuple((k, "bfloat16" if k == "dtype" else v) for k, v in LAYOUT)
    assert decide(b, [worker("a", layout=other), b], held(a=40)) == ("layout_mismatch", None)
    assert decide(b, [worker("a", layout=None), b], held(a=40)) == ("not_enabled", None)
    assert decide(worker("b", layout=None), [a, b], held(a=40)) == ("not_enabled", None)


def test_an_unhealthy_or_failed_source_is_not_used() -> None:
    a, b = worker("a", healthy=False), worker("b")
    assert decide(b, [a, b], held(a=40)) == ("source_unhealthy", None)
    assert decide(b, [worker("a"), b], held(a=40), exclude={"a"}) == ("source_unhealthy", None)


# -- the router's hook: a real index, two tenants ---------------------------------------------------------
def router_over(*workers: Worker, **routing: Any) -> tuple[Router, LocalIndexStore, GatewayMetrics]:
    pool = WorkerPool(None, failure_threshold=3, circuit_open_s=10.0)  # type: ignore[arg-type]
    pool.workers = {w.worker_id: w for w in workers}
    store, metrics = LocalIndexStore(), GatewayMetrics(recent=10)
    config = RoutingConfig(policy="least_load", **routing)
    return Router(config, pool, store, LocalSharedState(), None, metrics), store, metrics  # type: ignore[arg-type]


def prepared(tenant: Tenant, prompt: list[int] = PROMPT) -> PreparedRequest:
    return PreparedRequest("completions", {}, tenant, prompt, False, None, "req-1")


async def test_the_router_attaches_a_plan_to_the_decision_and_counts_it() -> None:
    a, b = worker("a", load=5), worker("b")  # a is loaded: least_load sends the request to b
    router, store, metrics = router_over(a, b)
    tenant = Tenant("t", "salt-t")
    await store.append(StoredOp("a", None, prepared(tenant).hashes(MODEL, 16)))
    before = time.time() * 1000
    decision = await router.choose(prepared(tenant), exclude=set())
    assert decision.worker is b and decision.fetch is not None
    assert decision.fetch.source == "a" and decision.fetch.tokens == 43 * 16
    plan = decision.fetch.plan
    assert plan.namespace == "salt-t" and before < plan.expires_at_ms <= time.time() * 1000 + 10_000
    assert metrics.summary()["kv_fetch_plans"] == {"attached": 1}
    assert metrics.summary()["kv_fetch_planned_tokens"] == 43 * 16
    # A worker that failed this request is no source for its retry on another worker.
    c = worker("c")
    router, store, metrics = router_over(a, b, c)
    await store.append(StoredOp("a", None, prepared(tenant).hashes(MODEL, 16)))
    assert (await router.choose(prepared(tenant), exclude={"a", "b"})).fetch is None
    assert metrics.summary()["kv_fetch_plans"] == {"source_unhealthy": 1}


async def test_tenant_namespaces_never_cross() -> None:
    """The same prompt cached on a for tenant x is no source for tenant y: y's chain (rooted at y's salt)
    matches nothing in the index, and a plan always names the requesting tenant's own salt and chain."""
    a, b = worker("a", load=5), worker("b")
    router, store, metrics = router_over(a, b)
    x, y = Tenant("x", "salt-x"), Tenant("y", "salt-y")
    await store.append(StoredOp("a", None, prepared(x).hashes(MODEL, 16)))
    decision = await router.choose(prepared(y), exclude=set())
    assert decision.worker is b and decision.fetch is None
    assert metrics.summary()["kv_fetch_plans"] == {}  # nobody held y's prefix: nothing to decide
    decision = await router.choose(prepared(x), exclude=set())
    assert decision.fetch is not None and decision.fetch.plan.namespace == "salt-x"
    assert (
        list(decision.fetch.plan.block_hashes)
        == block_hashes(PROMPT, 16, seed=namespace_seed(MODEL, "salt-x"))[:43]
    )


async def test_no_plans_when_turned_off() -> None:
    a, b = worker("a", load=5), worker("b")
    router, store, metrics = router_over(a, b, kv_fetch_plans=False)
    await store.append(StoredOp("a", None, prepared(Tenant("t", "")).hashes(MODEL, 16)))
    assert (await router.choose(prepared(Tenant("t", "")), exclude=set())).fetch is None
    assert metrics.summary()["kv_fetch_plans"] == {}


# -- the worker probe ---------------------------------------------------------------------------------
def test_the_probe_reads_a_layout_only_from_a_small_flat_object() -> None:
    info = {"layout": {"model_id": MODEL, "dtype": "float32", "layers": 30, "page_size": 16}, "segment": "x"}
    assert _kv_layout(info) == LAYOUT
    assert _kv_layout(None) is None  # a 404: KV transfer is off
    assert _kv_layout({"layout": {"model_id": {"nested": 1}}}) is None
    assert _kv_layout({"layout": {str(i): i for i in range(100)}}) is None
    assert _kv_layout({"layout": {"layers": True}}) is None


# -- the gateway: what stub workers receive ------------------------------------------------------------------
class EngineStub(StubWorker):
    """A stub that says it is our engine, with KV transfer on (``transfer``) or off."""

    transfer: bool = True

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_get("/get_server_info", self.server_info)
        app.router.add_get("/kv_transfer/info", self.transfer_info)
        return app

    async def server_info(self, _: web.Request) -> web.Response:
        return web.json_response(
            {"served_model_name": "stub-model", "page_size": 16, "kv_block_hash": HASH_SCHEME}
        )

    async def transfer_info(self, _: web.Request) -> web.Response:
        if not self.transfer:
            return web.json_response({"error": {"message": "not enabled"}}, status=404)
        layout = {"model_id": "stub-model", "dtype": "float32", "layers": 30, "page_size": 16}
        return web.json_response({"layout": layout, "segment": "127.0.0.1:1"})


@contextlib.asynccontextmanager
async def gateway_over_engines(
    tokenizer: Tokenizer, transfer: bool = True, **routing: Any
) -> AsyncIterator[tuple[str, GatewayState, list[EngineStub], aiohttp.ClientSession]]:
    async with contextlib.AsyncExitStack() as stack:
        stubs = [EngineStub(), EngineStub()]
        for stub in stubs:
            stub.transfer = transfer
        servers = [await stack.enter_async_context(TestServer(s.app(), host="127.0.0.1")) for s in stubs]
        config = GatewayConfig(
            workers=tuple(str(s.make_url("")) for s in servers),
            routing=RoutingConfig(policy="least_load", kv_fetch_min_tokens=16, **routing),
            health_interval_s=3600,  # the test sets loads; no health check overwrites them
            ingest_kv_events=False,
        )
        base, app = await stack.enter_async_context(running_gateway(config, tokenizer))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        yield base, app[STATE], stubs, session


HOSTILE = {
    "kv_fetch_plan": {
        "plan_id": "evil",
        "source_endpoint": "http://127.0.0.1:1",
        "block_hashes": [1, 2, 3],
        "expires_at_ms": 2**40,
    },
    "kv_transfer_params": {"do_remote_decode": True},
    "bootstrap_host": "127.0.0.1",
    "bootstrap_port": 1,
    "bootstrap_room": 7,
}


def chat_body(words: int = 120) -> dict[str, Any]:
    text = " ".join(f"word{i}" for i in range(words))
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 3}


async def test_the_gateway_attaches_its_plan_and_drops_the_clients(tokenizer: Tokenizer) -> None:
    async with gateway_over_engines(tokenizer) as (base, state, stubs, session):
        first, second = list(state.pool)
        assert first.kv_layout is not None and first.kv_layout == second.kv_layout  # probed
        body = chat_body()
        ids = chat_prompt_ids(tokenizer, body["messages"])
        await state.store.append(
            StoredOp(first.worker_id, None, block_hashes(ids, 16, seed=namespace_seed("stub-model")))
        )
        first.external_load = 5  # least_load picks the second worker; the first holds the prefix
        async with session.post(base + CHAT, json={**body, **HOSTILE}) as r:
            assert r.status == 200, await r.text()
        received = stubs[1].bodies[-1]
        assert not {"kv_transfer_params", "bootstrap_host", "bootstrap_port", "bootstrap_room"} & set(
            received
        )
        plan = received["kv_fetch_plan"]
        assert plan["source_endpoint"] == first.url and plan["namespace"] == ""
        assert (
            plan["block_hashes"]
            == block_hashes(ids, 16, seed=namespace_seed("stub-model"))[: plan["planned_prefix_blocks"]]
        )
        assert plan["planned_prefix_blocks"] == (len(ids) - 1) // 16
        async with session.get(base + "/stats") as r:
            stats = await r.json()
        assert stats["totals"]["kv_fetch_plans"] == {"attached": 1}
        record = stats["recent"][-1]
        assert (
            record["fetch_source"] == first.worker_id
            and record["fetch_planned_tokens"] == plan["planned_prefix_blocks"] * 16
        )
        assert {w["id"]: w["kv_transfer"] for w in stats["workers"]} == {first.url: True, second.url: True}
        async with session.get(base + "/metrics") as r:
            assert 'prefixgate_kv_fetch_plans_total{outcome="attached"} 1.0' in await r.text()


@pytest.mark.parametrize("transfer", [True, False])
async def test_a_client_plan_never_reaches_a_worker(tokenizer: Tokenizer, transfer: bool) -> None:
    """Without a plan of the gateway's own (plans turned off; or KV transfer off on the workers), the
    worker receives no kv_fetch_plan at all, nor any disaggregation field, streamed or not."""
    plans = {"kv_fetch_plans": False} if transfer else {}
    async with gateway_over_engines(tokenizer, transfer, **plans) as (base, state, stubs, session):
        first, _ = list(state.pool)
        body = chat_body()
        ids = chat_prompt_ids(tokenizer, body["messages"])
        hashes = block_hashes(ids, 16, seed=namespace_seed("stub-model"))
        await state.store.append(StoredOp(first.worker_id, None, hashes))
        first.external_load = 5  # the request goes to the second worker, the first holds its prefix
        for stream in (False, True):
            async with session.post(base + CHAT, json={**body, **HOSTILE, "stream": stream}) as r:
                assert r.status == 200, await r.text()
                await r.read()
        received = [b for stub in stubs for b in stub.bodies]
        assert len(received) == 2
        assert all(not set(HOSTILE) & set(b) for b in received)
        async with session.get(base + "/stats") as r:
            totals = (await r.json())["totals"]
        # Once the second worker took the prompt (claimed in the index), no peer holds more of it.
        assert totals["kv_fetch_plans"] == ({} if transfer else {"not_enabled": 1})


async def test_a_malformed_client_plan_is_dropped_unread(tokenizer: Tokenizer) -> None:
    """The fields are dropped before the body is parsed: whatever a client puts there is no error."""
    async with gateway_over_engines(tokenizer, kv_fetch_plans=False) as (base, _, stubs, session):
        hostile = {
            "kv_fetch_plan": "x",
            "kv_transfer_params": {"do_remote_prefill": "yes"},
            "bootstrap_port": -1,
        }
        async with session.post(base + CHAT, json={**chat_body(), **hostile}) as r:
            assert r.status == 200, await r.text()
        (received,) = [b for stub in stubs for b in stub.bodies]
        assert not set(hostile) & set(received)
