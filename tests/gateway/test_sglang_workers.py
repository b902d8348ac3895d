"""SGLang workers launched and supervised, and attached through their KV events, against a STAND-IN.

Real SGLang servers cannot run here (no GPU; their CUDA build cannot be brought to the GPU machine), so
the processes are ``tests/gateway/sglang_standin.py``: SGLang's HTTP endpoints and SGLang's own event
publisher around a toy prefix cache, started with the arguments of the real SGLang command line that
``gateway.engines`` builds (only ``python -m sglang.launch_server`` is replaced by the stand-in's module).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from cache.prompt.tokenizer import Tokenizer
from gateway.config import GatewayConfig, RoutingConfig
from gateway.engines import EngineLaunch, plan
from gateway.launcher import free_ports, healthy
from gateway.state import STATE
from gateway.supervisor import Supervisor
from tests.gateway.conftest import running_gateway

pytestmark = pytest.mark.slow  # starts worker processes
MODEL = "standin-model"
SYSTEM = "You are a careful assistant. " + " ".join(f"Rule {i}: answer in plain words." for i in range(40))


def standin_launches(count: int, extra: list[str] | None = None) -> list[EngineLaunch]:
    launches = plan("sglang", MODEL, [[i] for i in range(count)], free_ports(2 * count), extra or [])
    for launch in launches:
        assert launch.command[1:3] == ["-m", "sglang.launch_server"]
    return [
        replace(x, command=[sys.executable, "-m", "tests.gateway.sglang_standin", *x.command[3:]])
        for x in launches
    ]


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60  # a bound on waiting, not a measured threshold
    while not predicate():
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(0.1)


async def until(predicate: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + 60
    while not predicate():
        assert time.monotonic() < deadline, f"never reached: {what}"
        await asyncio.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_supervisor_starts_waits_restarts_a_crashed_worker_and_stops(tmp_path: Path) -> None:
    supervisor = Supervisor(standin_launches(2), 120, tmp_path, restart_delay_s=0.2)
    with supervisor.running():
        assert supervisor.all_healthy()  # running() returns only once every worker answers /health
        first_pids = supervisor.pids()
        os.kill(first_pids[0], signal.SIGKILL)
        wait_until(
            lambda: supervisor.restarts()[0] == 1 and healthy(supervisor.urls[0]), "worker 0 restarted"
        )
        assert supervisor.pids()[0] != first_pids[0] and supervisor.pids()[1] == first_pids[1]
        assert supervisor.restarts()[1] == 0
        last_pids = supervisor.pids()
    assert not any(_alive(pid) for pid in last_pids if pid)  # stopped cleanly, none left behind
    assert (tmp_path / "worker0.log").exists()


async def chat(session: aiohttp.ClientSession, base: str, text: str) -> dict:
    body = {
        "model": MODEL,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
    }
    async with session.post(f"{base}/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def flush(session: aiohttp.ClientSession, url: str) -> None:
    async with session.post(f"{url}/flush_cache") as r:
        assert r.status == 200


async def standin_cache(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(f"{url}/standin/cache") as r:
        return await r.json()


async def test_the_index_mirrors_an_sglang_workers_cache_and_routes_a_repeat_to_it(
    tokenizer: Tokenizer,
) -> None:
    launches = standin_launches(2)
    supervisor = Supervisor(launches, 120)
    with supervisor.running():
        config = GatewayConfig(
            workers=tuple(supervisor.urls),
            worker_events=tuple(x.events for x in launches),
            routing=RoutingConfig(policy="cache_aware"),
            health_interval_s=0.5,
        )
        async with running_gateway(config, tokenizer) as (base, app), aiohttp.ClientSession() as session:
            state = app[STATE]
            a, b = supervisor.urls
            workers = {w.url: w for w in state.pool}
            assert all(w.events_ingested and not w.own_hashes for w in workers.values())
            assert workers[b].page_size == 16

            def index_blocks(url: str) -> int:
                return state.store.index.stats().per_worker.get(url, (0, 0))[0]

            # SGLang's publisher connects to the gateway: until it has, its batches are lost, and a block
            # whose parent was in a lost batch cannot be named. Flush B (AllBlocksCleared) and chat with it
            # directly until its events arrive; then flush once more and start clean.
            n, deadline = 0, time.monotonic() + 60  # a bound on waiting, not a measured threshold
            while index_blocks(b) == 0:
                assert time.monotonic() < deadline, f"B's events never arrived: {workers[b].describe()}"
                await flush(session, b)
                await chat(session, b, f"warm-up {n}")
                n += 1
                await asyncio.sleep(0.1)
            await flush(session, b)
            await until(lambda: index_blocks(b) == 0, "B's entries cleared")

            # A client talks to B directly (not through the gateway): the gateway learns it from B's events.
            await chat(session, b, "What is a prefix cache?")
            held = (await standin_cache(session, b))["pages"][0]
            assert held > 10
            await until(lambda: index_blocks(b) == held, "the index holds exactly B's pages")
            assert index_blocks(a) == 0

            requests_before = [(await standin_cache(session, u))["requests"] for u in (a, b)]
            await chat(session, base, "What is a prefix cache?")  # the same prompt, through the gateway
            requests_after = [(await standin_cache(session, u))["requests"] for u in (a, b)]
            assert requests_after == [requests_before[0], requests_before[1] + 1]  # routed to B
