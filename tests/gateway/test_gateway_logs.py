"""What the gateway's log says, for an operator following it: failures under the gateway's own logger
names, a stream that breaks off named with its request."""

from __future__ import annotations

import logging

import pytest

from cache.prompt.tokenizer import Tokenizer
from tests.gateway.test_dispatch import BODY, CHAT, gateway_over, read_events


async def test_a_worker_dying_mid_stream_is_logged_by_the_gateway(
    tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with gateway_over(tokenizer, "break_mid_stream") as g:
        async with g.session.post(g.base + CHAT, json={**BODY, "stream": True}) as r:
            await read_events(r)
        request_id, worker = g.state.metrics.recent[-1].request_id, g.worker(0).url
    [line] = [r for r in caplog.records if "mid-stream" in r.getMessage()]
    assert line.name.startswith("gateway.") and request_id in line.getMessage()
    assert worker in line.getMessage()  # which worker


async def test_gateway_failures_are_logged_under_gateway_logger_names(
    tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with (
        gateway_over(tokenizer, "error_500", "error_500") as g,
        g.session.post(g.base + CHAT, json=BODY) as r,
    ):
        assert r.status == 502
    names = {r.name for r in caplog.records}
    assert "gateway.app" in names  # the 502 itself, logged by the gateway's error middleware
    assert all(name.startswith("gateway.") for name in names), names
