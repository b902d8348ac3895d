"""``python -m engine.benchmark_transfer``: a prefix fetched from a peer engine vs recomputed.

Two engine servers in one process (one loaded model, two KV pools), Mooncake over TCP on loopback.
For each trial a fresh prompt is computed on A (untimed), then sent to B twice over HTTP: once
with a fetch plan pointing at A, once (another fresh prompt) without, so B recomputes it. TTFT is a
``/generate`` of one new token. Then the raw transfer: the same bytes read with the transport from
A's export buffer into B's import buffer vs a plain ``torch`` memcpy in one process.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp
import torch

from engine.config import EngineConfig
from engine.loader import load_model
from engine.server.app import create_app, load_engine, start_site
from engine.server.state import STATE, ServerSettings
from engine.transfer.config import TransferConfig


async def _run(args: argparse.Namespace) -> None:
    config = EngineConfig(dtype=args.dtype, kv_cache_tokens=args.kv_cache_tokens, threads=args.threads)
    loaded = load_model(config)
    transfer = TransferConfig(
        export_buffer_mib=args.buffer_mib, import_buffer_mib=args.buffer_mib, timeout_s=60
    )
    settings = ServerSettings(port=0, kv_transfer=transfer)
    apps, runners, urls = [], [], []
    for _ in range(2):
        engine, publisher = load_engine(config, settings, loaded)
        app = create_app(engine, settings, publisher)
        runner, port = await start_site(app, "127.0.0.1", 0)
        apps.append(app)
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{port}")
    a, b = urls
    source = apps[0][STATE].engine.engine
    ps = source.info.page_size

    def prompt(trial: int) -> list[int]:
        return [1 + trial, *[(trial * 7919 + i * 31) % 40000 + 500 for i in range(args.prompt_tokens - 1)]]

    async def ttft(session: aiohttp.ClientSession, url: str, ids: list[int], plan: dict | None) -> float:
        body: dict = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
        if plan:
            body["kv_fetch_plan"] = plan
        start = time.perf_counter()
        async with session.post(f"{url}/generate", json=body) as response:
            out = await response.json()
        assert response.status == 200, out
        return time.perf_counter() - start

    fetched, recomputed = [], []
    async with aiohttp.ClientSession() as session:
        await ttft(session, b, prompt(10_000), None)  # warm-up: first forward passes, first handshake
        for trial in range(args.trials):
            ids = prompt(2 * trial)
            await ttft(session, a, ids, None)  # A caches it
            hashes = source.cache.hasher(None, ids[: (len(ids) - 1) // ps * ps])  # type: ignore[misc]
            plan = {
                "plan_id": f"bench-{trial}",
                "source_endpoint": a,
                "block_hashes": hashes,
                "planned_prefix_blocks": len(hashes),
                "expires_at_ms": int(time.time() * 1000) + 60_000,
            }
            fetched.append(await ttft(session, b, ids, plan))
            recomputed.append(await ttft(session, b, prompt(2 * trial + 1), None))
        metrics = await (await session.get(f"{b}/metrics")).text()
    fetched_tokens = next(
        line.split()[-1]
        for line in metrics.splitlines()
        if line.startswith("prefixgate_engine_kv_fetched_tokens_total")
    )
    f, r = statistics.median(fetched), statistics.median(recomputed)
    print(f"prompt {args.prompt_tokens} tokens, {args.trials} trials, dtype {source.runner.kv.k.dtype}")
    print(f"TTFT recomputed   median {r * 1000:8.1f} ms  {[round(x * 1000) for x in recomputed]}")
    print(f"TTFT fetched      median {f * 1000:8.1f} ms  {[round(x * 1000) for x in fetched]}")
    print(f"fetched / recomputed = {f / r:.3f}x  (B fetched {fetched_tokens} tokens in all)")

    # Raw throughput: the bytes of that prefix, A's export buffer -> B's import buffer.
    service_a, service_b = apps[0][STATE].transfer, apps[1][STATE].transfer
    assert service_a is not None and service_b is not None
    nbytes = (args.prompt_tokens // ps) * service_a.layout.page_bytes
    src, dst = service_a.export_buffer, service_b.import_buffer
    src.tensor[:nbytes].random_(0, 255)

    def read() -> None:
        service_b.transport.read(service_a.transport.segment, dst.address, src.address, nbytes)

    def memcpy() -> None:
        dst.tensor[:nbytes].copy_(src.tensor[:nbytes])

    for name, fn in (("mooncake tcp", read), ("memcpy", memcpy)):
        fn()
        times = []
        for _ in range(args.copies):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        best, median = min(times), statistics.median(times)
        print(
            f"{name:13s} {nbytes / 2**20:7.1f} MiB: median {nbytes / median / 1e9:5.2f} GB/s, "
            f"best {nbytes / best / 1e9:5.2f} GB/s"
        )
    assert torch.equal(dst.tensor[:nbytes], src.tensor[:nbytes])
    for runner in runners:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--kv-cache-tokens", type=int, default=8192)
    parser.add_argument("--buffer-mib", type=int, default=256)
    asyncio.run(_run(parser.parse_args()))


if __name__ == "__main__":
    main()
