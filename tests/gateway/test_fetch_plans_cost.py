"""Fetch plans weighed by measurements (gateway/fetch_plans.py ``fetch_pays``): a plan is attached when the
chosen worker's measured link moves the blocks sooner than its measured prefill recomputes them, with
the token floor below that and alone until both are measured; and the worker probe that reads the link's
figures (gateway/workers.py), from workers that are not trusted. Synthetic measurements, no model."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from cache.index.ops import StoredOp
from cache.planning.fetch_cost import FetchCost
from cache.planning.load_profile import LoadProfile
from cache.wire.hashing import HASH_SCHEME
from gateway.config import Tenant
from gateway.workers import Worker, WorkerPool
from tests.gateway.test_fetch_plans import MODEL, decide, held, prepared, router_over

# SmolLM2-135M's KV: 30 layers x 3 KV heads x 64 dims, fp32: 2 x 30 x 3 x 64 x 4 = 46,080 bytes a token.
LAYOUT = tuple(
    sorted(
        {
            "model_id": MODEL,
            "dtype": "float32",
            "layers": 30,
            "page_size": 16,
            "kv_heads": 3,
            "head_dim": 64,
            "element_bytes": 4,
        }.items()
    )
)
BYTES_PER_TOKEN = 46_080
MOVED = 35 * 16  # tokens b lacks of what a holds in held(a=40, b=5)


def worker(
    name: str, cost: FetchCost | None = None, prefill_tokens_per_s: float | None = None, load: int = 0
) -> Worker:
    w = Worker(url=f"http://127.0.0.1:{9000 + ord(name[0])}", worker_id=name, kind="prefixgate")
    w.model_id, w.kv_layout, w.healthy, w.external_load = MODEL, LAYOUT, True, load
    w.kv_fetch_cost = cost
    w.load_profile = LoadProfile(prefill_tokens_per_s) if prefill_tokens_per_s is not None else None
    return w


def test_bytes_per_token_come_from_the_layout() -> None:
    assert worker("a").kv_bytes_per_token == BYTES_PER_TOKEN
    partial = worker("a")
    partial.kv_layout = tuple((k, v) for k, v in LAYOUT if k != "head_dim")
    assert partial.kv_bytes_per_token is None  # a layout that does not say: no byte count, no estimate
    partial.kv_layout = tuple((k, 0 if k == "layers" else v) for k, v in LAYOUT)
    assert partial.kv_bytes_per_token is None


def test_a_plan_is_attached_when_moving_is_measured_cheaper() -> None:
    # 560 tokens = 25.8 MB: 2 ms + 25.8 ms at 1 GB/s, against 280 ms at 2,000 tokens/s.
    b = worker("b", FetchCost(1e9, 0.002, 5), prefill_tokens_per_s=2000)
    outcome, fetch = decide(b, [worker("a"), b], held(a=40, b=5))
    assert outcome == "attached" and fetch is not None and fetch.tokens == MOVED


def test_no_plan_when_recomputing_is_measured_as_fast() -> None:
    a = worker("a")
    fast_prefill = worker("b", FetchCost(1e9, 0.002, 5), prefill_tokens_per_s=50_000)  # 11 ms < 28 ms
    assert decide(fast_prefill, [a, fast_prefill], held(a=40, b=5)) == ("not_cheaper", None)
    slow_round_trip = worker("b", FetchCost(1e12, 0.5, 5), prefill_tokens_per_s=2000)  # 280 ms < 500 ms
    assert decide(slow_round_trip, [a, slow_round_trip], held(a=40, b=5)) == ("not_cheaper", None)
    # Exactly as fast is not cheaper: the plan must win something for its risk.
    seconds = 0.002 + MOVED * BYTES_PER_TOKEN / 1e9
    tie = worker("b", FetchCost(1e9, 0.002, 5), prefill_tokens_per_s=MOVED / seconds)
    assert decide(tie, [a, tie], held(a=40, b=5))[0] == "not_cheaper"


def test_the_chosen_workers_measurements_count_not_the_sources() -> None:
    """The target waits for the pages: its link and its prefill rate decide, whatever the source measured."""
    a = worker("a", FetchCost(1.0, 100.0, 5), prefill_tokens_per_s=1e9)
    b = worker("b", FetchCost(1e9, 0.002, 5), prefill_tokens_per_s=2000)
    assert decide(b, [a, b], held(a=40, b=5))[0] == "attached"


def test_until_both_are_measured_the_token_floor_decides_alone() -> None:
    a = worker("a")
    unmeasured = [
        worker("b"),  # nothing measured
        worker("b", FetchCost(), prefill_tokens_per_s=2000),  # no fetch yet
        worker("b", FetchCost(1e9, 0.002, 5)),  # no prefill rate
        worker("b", FetchCost(1e9, 0.002, 5), prefill_tokens_per_s=None),
    ]
    for b in unmeasured:
        assert decide(b, [a, b], held(a=40, b=5))[0] == "attached"
        assert decide(b, [a, b], held(a=10)) == ("below_min", None)  # 160 tokens < 256
    # A layout that does not say its element size gives no byte count: no estimate either.
    a, b = worker("a"), worker("b", FetchCost(1e9, 0.002, 5), prefill_tokens_per_s=1e9)
    a.kv_layout = b.kv_layout = tuple((k, v) for k, v in LAYOUT if k != "element_bytes")
    assert decide(b, [a, b], held(a=40, b=5))[0] == "attached"


def test_the_token_floor_holds_however_cheap_moving_is_measured() -> None:
    b = worker("b", FetchCost(1e12, 1e-6, 5), prefill_tokens_per_s=1.0)
    assert decide(b, [worker("a"), b], held(a=10)) == ("below_min", None)
    assert decide(b, [worker("a"), b], held(a=10), min_tokens=0)[0] == "attached"


async def test_the_router_counts_a_plan_that_does_not_pay() -> None:
    a, b = worker("a", load=5), worker("b", FetchCost(1e9, 0.002, 5), prefill_tokens_per_s=1e6)
    router, store, metrics = router_over(a, b)
    tenant = Tenant("t", "")
    await store.append(StoredOp("a", None, prepared(tenant).hashes(MODEL, 16)))
    decision = await router.choose(prepared(tenant), exclude=set())
    assert decision.worker is b and decision.fetch is None
    assert metrics.summary()["kv_fetch_plans"] == {"not_cheaper": 1}
    assert metrics.summary()["kv_fetch_planned_tokens"] == 0


# -- the worker probe: the figures, re-read at every health check ------------------------------------------
class TransferEngineStub:
    """Answers the probe and the health check as our engine with ``--kv-transfer`` does; ``fetch_cost``
    and ``info_status`` are what ``GET /kv_transfer/info`` says next."""

    def __init__(self) -> None:
        self.fetch_cost: Any = FetchCost().to_json()
        self.info_status = 200

    def app(self) -> web.Application:
        app = web.Application()
        answers = {
            "/get_server_info": {"served_model_name": MODEL, "page_size": 16, "kv_block_hash": HASH_SCHEME},
            "/v1/models": {"data": [{"id": MODEL}]},
            "/health": {},
            "/get_load": {"num_reqs": 0, "num_waiting_reqs": 0},
            "/load_profile": LoadProfile(2000.0).to_json(),
        }

        async def answer(request: web.Request) -> web.Response:
            return web.json_response(answers[request.path])

        for path in answers:
            app.router.add_get(path, answer)
        app.router.add_get("/kv_transfer/info", self.transfer_info)
        return app

    async def transfer_info(self, _: web.Request) -> web.Response:
        if self.info_status != 200:
            return web.json_response({"error": {"message": "down"}}, status=self.info_status)
        layout = dict(LAYOUT)
        return web.json_response({"layout": layout, "segment": "127.0.0.1:1", "fetch_cost": self.fetch_cost})


@contextlib.asynccontextmanager
async def probed_worker() -> AsyncIterator[tuple[TransferEngineStub, WorkerPool, Worker]]:
    stub = TransferEngineStub()
    async with TestServer(stub.app(), host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        pool = WorkerPool(session, failure_threshold=3, circuit_open_s=10.0)
        worker = await pool.add(str(server.make_url("")))
        yield stub, pool, worker


async def test_the_probe_and_every_health_check_read_the_fetch_figures() -> None:
    async with probed_worker() as (stub, pool, worker):
        assert worker.kind == "prefixgate" and worker.kv_layout == LAYOUT
        assert worker.kv_fetch_cost == FetchCost() and worker.kv_bytes_per_token == BYTES_PER_TOKEN
        stub.fetch_cost = FetchCost(1.5e9, 0.004, 3).to_json()
        await pool.check(worker)
        assert worker.kv_fetch_cost == FetchCost(1.5e9, 0.004, 3)
        assert worker.load_profile == LoadProfile(2000.0)


async def test_hostile_figures_are_dropped_and_a_missed_answer_keeps_what_is_known() -> None:
    async with probed_worker() as (stub, pool, worker):
        stub.fetch_cost = FetchCost(1e9, 0.002, 1).to_json()
        await pool.check(worker)
        stub.info_status = 500  # one answer that does not come: layout and figures stay
        await pool.check(worker)
        assert worker.kv_layout == LAYOUT and worker.kv_fetch_cost == FetchCost(1e9, 0.002, 1)
        stub.info_status = 200
        for hostile in ({"bytes_per_s": -5, "round_trip_s": 0.001}, "fast", [1, 2], {"bytes_per_s": 1e9}):
            stub.fetch_cost = hostile
            await pool.check(worker)
            assert worker.kv_layout == LAYOUT and worker.kv_fetch_cost is None  # the token floor decides
