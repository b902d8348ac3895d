"""The pure parts of KV transfer: the fetch plan in the request contract, the control messages and
the staging buffer's regions. No model, no network."""

from __future__ import annotations

import pytest

from cache.api.errors import ApiError
from cache.api.kv_fields import FetchPlan, get_fetch_plan
from engine.transfer.buffer import TransferBuffer
from engine.transfer.protocol import ExportReply, ExportRequest, KVLayout, ProtocolError

LAYOUT = KVLayout("m", "float32", 30, 16, 3, 64, 4)
PLAN = {
    "plan_id": "p",
    "source_endpoint": "http://127.0.0.1:30001/",
    "block_hashes": [1, 2, 2**64 - 1],
    "expires_at_ms": 5,
}


def test_a_fetch_plan_parses_with_defaults() -> None:
    plan = get_fetch_plan({"kv_fetch_plan": PLAN})
    assert plan == FetchPlan("p", "http://127.0.0.1:30001", (1, 2, 2**64 - 1), 3, 5, "")
    assert get_fetch_plan({}) is None


@pytest.mark.parametrize(
    "change",
    [
        {"plan_id": ""},
        {"source_endpoint": "tcp://x"},
        {"block_hashes": []},
        {"block_hashes": [-1]},
        {"block_hashes": [2**64]},
        {"block_hashes": [True]},
        {"planned_prefix_blocks": 4},
        {"planned_prefix_blocks": 0},
        {"expires_at_ms": None},
        {"namespace": 3},
    ],
)
def test_a_malformed_fetch_plan_is_a_400(change: dict) -> None:
    with pytest.raises(ApiError) as error:
        get_fetch_plan({"kv_fetch_plan": {**PLAN, **change}})
    assert error.value.status == 400


def test_control_messages_round_trip_and_are_checked() -> None:
    request = ExportRequest("p", "salt", [1, 2, 3], 1, LAYOUT)
    assert ExportRequest.from_json(request.to_json()) == request
    reply = ExportReply("lease", "127.0.0.1:1", 4096, 1, 2, [7, 8], LAYOUT, 1000)
    assert ExportReply.from_json(reply.to_json()) == reply
    assert LAYOUT.page_bytes == 2 * 30 * 16 * 3 * 64 * 4
    with pytest.raises(ProtocolError):
        ExportRequest.from_json({**request.to_json(), "version": 2})
    with pytest.raises(ProtocolError):
        ExportRequest.from_json({**request.to_json(), "first_block": 3})
    with pytest.raises(ProtocolError):
        ExportReply.from_json({**reply.to_json(), "checksums": [7]})
    with pytest.raises(ProtocolError):
        KVLayout.from_json({"model_id": "m"})


class NoTransport:
    name, segment = "none", "none"

    def register(self, address: int, length: int) -> None: ...
    def unregister(self, address: int) -> None: ...
    def read(self, segment: str, local_address: int, remote_address: int, length: int) -> None: ...
    def close(self) -> None: ...


def test_the_staging_buffer_hands_out_disjoint_regions_and_refuses_when_full() -> None:
    buffer = TransferBuffer(4 * 4096, NoTransport())
    a, b = buffer.reserve(4096), buffer.reserve(5000)
    assert a == (0, 4096) and b == (4096, 8192)
    assert buffer.reserve(8192) is None  # backpressure: one page of room left
    buffer.free(a)
    assert buffer.reserve(8192) is None  # free space is not contiguous
    buffer.free(b)
    assert buffer.used_bytes == 0
    assert buffer.reserve(4 * 4096) == (0, 4 * 4096)  # freed regions coalesce
    with pytest.raises(AssertionError):
        buffer.free((0, 4096))
        buffer.free((0, 4096))
