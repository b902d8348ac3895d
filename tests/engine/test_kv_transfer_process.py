"""KV transfer when a peer process is SIGKILLed: whatever it held on the survivor is freed.

The source is a real ``prefixgate engine --kv-transfer`` process. A reader that dies holding a lease
never releases it: the source frees it at the lease's expiry. A source that dies mid-transfer fails
the read: the reader recomputes, and frees its import region.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

pytest.importorskip("mooncake.engine", reason="KV transfer needs mooncake-transfer-engine-non-cuda")

from cache.wire.hashing import block_hashes, namespace_seed
from engine.transfer.config import TransferConfig
from scripts.sglang_router_demo import REPO, free_port, wait_until
from tests.engine.kv_transfer_helpers import (
    GatedTransport,
    Loop,
    generate,
    held,
    http,
    metric,
    nothing_held,
    start_server,
)
from tests.engine.kv_transfer_helpers import wait_until as wait_for

pytestmark = pytest.mark.slow

PROMPT = [7, *[(i * 31) % 40000 + 500 for i in range(199)]]


@pytest.fixture
def source(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    port = free_port()
    cmd = [sys.executable, "-m", "gateway.cli", "engine", "--port", str(port), "--dtype", "float32"]
    cmd += ["--kv-cache-tokens", "2048", "--threads", "1", "--kv-transfer", "--kv-transfer-buffer-mib", "16"]
    cmd += ["--kv-transfer-lease-ttl", "2"]
    with open(tmp_path / "source.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _status(url) == 200, "source engine", 180, proc)
        generate(url, PROMPT)  # the source caches the prompt's prefix
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _status(url: str) -> int:
    try:
        http("GET", f"{url}/health")
        return 200
    except (aiohttp.ClientError, OSError):
        return 0


def _plan(url: str) -> dict:
    model_id = http("GET", f"{url}/kv_transfer/info")["layout"]["model_id"]
    hashes = block_hashes(PROMPT[: (len(PROMPT) - 1) // 16 * 16], 16, seed=namespace_seed(model_id))
    return {
        "plan_id": "process-test",
        "source_endpoint": url,
        "block_hashes": hashes,
        "planned_prefix_blocks": len(hashes),
        "expires_at_ms": 2**62,
    }


_READER = """
import json, sys, time, urllib.request
url, ask = sys.argv[1], sys.argv[2]
request = urllib.request.Request(url + "/kv_transfer/export", data=ask.encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
reply = json.load(urllib.request.urlopen(request))
print(reply["lease_id"], flush=True)
time.sleep(3600)  # holds the lease until killed
"""


def test_a_reader_killed_while_holding_a_lease_never_pins_the_source(source) -> None:
    proc, url = source
    info = http("GET", f"{url}/kv_transfer/info")
    plan = _plan(url)
    ask = {"version": 1, "plan_id": "killed", "namespace": "", "block_hashes": plan["block_hashes"]}
    ask |= {"first_block": 0, "layout": info["layout"]}
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, url, json.dumps(ask)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip()  # it holds a lease now
        assert http("GET", f"{url}/kv_transfer/info")["export_leases"] == 1
        reader.send_signal(signal.SIGKILL)
        reader.wait()
    finally:
        if reader.poll() is None:
            reader.kill()
    wait_for(lambda: http("GET", f"{url}/kv_transfer/info")["export_leases"] == 0, "the lease expired")
    after = http("GET", f"{url}/kv_transfer/info")
    assert after["expired_leases"] == 1 and after["export_bytes_leased"] == 0
    assert proc.poll() is None


def test_a_source_killed_mid_transfer_leaves_the_reader_whole(
    source, smollm2_gguf_path: Path, smollm2_model
) -> None:
    proc, url = source
    loop = Loop()
    config = TransferConfig(export_buffer_mib=16, import_buffer_mib=16, timeout_s=120.0)
    reader = start_server(loop, str(smollm2_gguf_path), smollm2_model, config, gated=True)
    service = reader.state.transfer
    assert service is not None and isinstance(service.transport, GatedTransport)
    gated = service.transport
    try:
        reference = generate(url, PROMPT)["output_ids"]
        plan = _plan(url)

        async def fetch_while_the_source_dies() -> dict:
            body = {
                "input_ids": PROMPT,
                "sampling_params": {"max_new_tokens": 8, "temperature": 0},
                "kv_fetch_plan": plan,
            }
            async with aiohttp.ClientSession() as session:
                post = asyncio.ensure_future(session.post(f"{reader.url}/generate", json=body))
                await asyncio.to_thread(gated.reading.wait, 60)  # the source has staged, B reserved
                proc.send_signal(signal.SIGKILL)
                await asyncio.to_thread(proc.wait)
                gated.gate.set()  # now B reads from a dead peer
                response = await post
                return await response.json()

        with held(gated):
            out = asyncio.run(fetch_while_the_source_dies())
        assert out["output_ids"] == reference  # recomputed, same tokens
        assert out["meta_info"]["cached_tokens"] == 0
        failures = metric(reader.url, 'kv_fetches_total{outcome="transfer_failed"}')
        failures += metric(reader.url, 'kv_fetches_total{outcome="timeout"}')
        assert failures == 1
        wait_for(lambda: nothing_held(reader), "the reader's import region freed")
        stats = reader.state.engine.stats
        assert stats.pages_used == stats.pages_cached  # no page outside the tree and the free list
    finally:
        loop.run(reader.runner.cleanup())
        loop.close()
