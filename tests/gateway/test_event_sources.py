"""KV event sources: command-line specs, wildcard hosts, DP-rank offsets; and the subscriptions a spec
makes, against vLLM's own publisher on two DP ranks over loopback."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import sglang.srt.disaggregation.kv_events as sglang_events  # SGLang 0.5.2, installed by scripts/setup.sh
import zmq.asyncio

from cache.index.rekey import ForeignWorkerNames
from cache.index.store import LocalIndexStore
from cache.index.zmq_consumer import KVEventConsumer
from gateway.event_sources import (
    EventSource,
    engine_binds,
    on_worker_host,
    parse_worker_events,
    rank_endpoint,
)
from tests.cache.index import vllm_kv_events as vllm
from tests.cache.index.test_rekey import MODEL, WORKER
from tests.cache.index.test_zmq_foreign import port_pairs, stop, two_ranks_indexed_then_a_gap_replayed
from tests.gateway.test_workers import SGLANG_INFO, probed


def test_worker_events_specs() -> None:
    assert parse_worker_events(
        ("http://w1:30000/=tcp://*:5557", "http://127.0.0.1:8001=bind:tcp://127.0.0.1:6000")
    ) == {
        "http://w1:30000": EventSource("tcp://w1:5557"),
        "http://127.0.0.1:8001": EventSource("tcp://127.0.0.1:6000", bind=True),
    }
    for bad in ("http://w1:30000", "http://w1:30000=w1:5557", "=tcp://w:1"):
        with pytest.raises(ValueError, match="--worker-events"):
            parse_worker_events((bad,))


def test_wildcards_mean_the_worker_host() -> None:
    for wildcard in ("*", "0.0.0.0", "::", "[::]"):
        assert on_worker_host(f"tcp://{wildcard}:5557", "http://10.1.2.3:30000") == "tcp://10.1.2.3:5557"
    assert on_worker_host("tcp://*:5557", "http://[fd00::1]:30000") == "tcp://[fd00::1]:5557"
    assert on_worker_host("tcp://10.9.9.9:5557", "http://10.1.2.3:30000") == "tcp://10.9.9.9:5557"


@pytest.mark.parametrize("endpoint", ["tcp://*:5557", "tcp://127.0.0.1:5557", "inproc://kv"])
@pytest.mark.parametrize("rank", [0, 1, 3])
def test_rank_offsets_and_bind_heuristic_are_sglangs(endpoint: str, rank: int) -> None:
    publisher = sglang_events.ZmqEventPublisher
    assert rank_endpoint(endpoint, rank) == publisher.offset_endpoint_port(endpoint, rank)
    assert engine_binds(endpoint) == ("*" in endpoint or endpoint.startswith("inproc://"))


def test_worker_events_options_name_the_replay_socket_and_the_dp_ranks() -> None:
    (url, source), *_ = parse_worker_events(
        ("http://w1:8000/=tcp://*:5557,replay=tcp://*:5600,dp=4",)
    ).items()
    assert url == "http://w1:8000"
    assert source == EventSource("tcp://w1:5557", replay_endpoint="tcp://w1:5600", dp_ranks=4)
    assert source.for_rank(3) == replace(source, endpoint="tcp://w1:5560", replay_endpoint="tcp://w1:5603")
    feed = source.feed("w1", 3)
    assert (feed.endpoint, feed.replay_endpoint, feed.rank, feed.bind) == (
        "tcp://w1:5560",
        "tcp://w1:5603",
        3,
        False,
    )
    bound = parse_worker_events(("http://w2:8000=bind:tcp://10.0.0.1:6000,dp=2,replay=tcp://w2:6100",))
    assert bound["http://w2:8000"] == EventSource(
        "tcp://10.0.0.1:6000", bind=True, replay_endpoint="tcp://w2:6100", dp_ranks=2
    )
    for bad in (
        "http://w=tcp://w:1,dp=0",
        "http://w=tcp://w:1,dp=257",
        "http://w=tcp://w:1,dp=two",
        "http://w=tcp://w:1,dp=²",
        "http://w=tcp://w:1,dp=" + "9" * 5000,
        "http://w=tcp://w:1,dp=2,dp=2",
        "http://w=tcp://w:1,replay=",
        "http://w=tcp://w:1,replay=w:2",
        "http://w=tcp://w:1,topic=kv",
        "http://w=tcp://w:1,",
        "http://w=tcp://w:65535,dp=2",  # rank 1 would be past the last port
        "http://w=ipc:///tmp/kv,dp=2",  # ipc paths cannot be offset by a rank
    ):
        with pytest.raises(ValueError, match="--worker-events"):
            parse_worker_events((bad,))


async def test_a_configured_dp_size_wins_over_the_reported_one() -> None:
    configured = EventSource("tcp://10.0.0.9:5557", dp_ranks=4)
    assert (await probed(None, SGLANG_INFO, configured)).dp_ranks == 4  # SGLang reports dp_size 2


@pytest.mark.skipif(vllm.installed_version() is None, reason="vLLM is not installed (scripts/setup.sh)")
async def test_vllm_dp_ranks_and_replay_as_the_flag_names_them() -> None:
    """``--worker-events URL=bind:tcp://127.0.0.1:P,replay=tcp://127.0.0.1:R,dp=2`` against two vLLM DP ranks
    (vLLM's own publisher: rank r connects to P + r and binds its replay socket at R + r): both ranks'
    blocks are indexed, and the batches rank 1 publishes while its subscription is down come back from
    rank 1's replay socket."""
    kv = vllm.load()
    pub, replay = port_pairs(2)
    spec = f"http://127.0.0.1:8000=bind:tcp://127.0.0.1:{pub},replay=tcp://127.0.0.1:{replay},dp=2"
    source = parse_worker_events((spec,))["http://127.0.0.1:8000"]
    assert source.dp_ranks == 2
    ctx = zmq.asyncio.Context()
    store = LocalIndexStore()
    names = ForeignWorkerNames(WORKER, MODEL, 16)
    consumers = [
        KVEventConsumer(source.feed(WORKER, rank), store.append_many, ctx, names=names)
        for rank in range(source.dp_ranks)
    ]
    tasks = [asyncio.create_task(c.run()) for c in consumers]
    ranks = [vllm.VllmRank(kv, rank, pub, replay) for rank in range(2)]
    try:
        await two_ranks_indexed_then_a_gap_replayed(consumers, tasks, ranks, store)
    finally:
        await stop(tasks, ranks, ctx)
