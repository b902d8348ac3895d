"""KV event sources: command-line specs, wildcard hosts, DP-rank offsets (pure)."""

from __future__ import annotations

import pytest
import sglang.srt.disaggregation.kv_events as sglang_events  # SGLang 0.5.2, installed by scripts/setup.sh

from gateway.event_sources import (
    EventSource,
    engine_binds,
    on_worker_host,
    parse_worker_events,
    rank_endpoint,
)


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
