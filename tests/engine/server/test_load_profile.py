"""``GET /load_profile``: what the worker measured of its own speed, for the gateway's P:D advice."""

from __future__ import annotations

import aiohttp
import pytest

from cache.planning.load_profile import LoadProfile
from tests.engine.server.conftest import EngineServer

pytestmark = pytest.mark.slow  # talks to a worker serving the real model


async def test_a_served_request_measures_prefill_and_decode(engine_server: EngineServer) -> None:
    prompt = "load profile " + " ".join(f"w{i}" for i in range(80))  # well over 32 uncached tokens
    async with aiohttp.ClientSession() as session:
        body = {
            "text": prompt,
            "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
        }
        async with session.post(engine_server.url + "/generate", json=body) as r:
            assert r.status == 200
        async with session.get(engine_server.url + "/load_profile") as r:
            assert r.status == 200
            profile = LoadProfile.from_json(await r.json())
    assert profile is not None and profile.measured
    assert profile.prefill_tokens_per_s is not None and profile.prefill_tokens_per_s > 0
    assert profile.decode and profile.decode[0].batch >= 1 and profile.decode[0].step_s > 0
    assert profile.max_batch == engine_server.engine.info.max_running
