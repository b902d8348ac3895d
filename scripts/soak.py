"""Mixed soak: real engine workers behind a real gateway, under a mix of normal, streamed, abandoned and
hostile traffic, sampling what must stay bounded: the gateway's index and session pins, the engines'
KV pools, and every process's memory. Not run in CI (``python scripts/soak.py --duration 600``).

Traffic (``--concurrency`` clients, each picks at random): chats sharing a few long system prompts
(cache hits), streamed chats, streams abandoned after the first chunk, a distinct 4 KB session key per
request, a client ``cache_salt``, bad parameters, and prompts far past the context (refused before
tokenizing). Every ``--sample-s`` it records one row; at the end it asserts that the last third of the
run stays within ``--slack`` of the first third's peak (plus ``--slack-mb`` for memory) and that the
index, pins and KV pools stay under their caps (they fill up by design), and prints the table
(``--json`` writes it too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.index.radix_index import RadixIndexConfig
from gateway.app import create_app, server_options
from gateway.config import GatewayConfig
from gateway.launcher import engine_workers
from gateway.shared_state import MAX_LOCAL_PINS
from gateway.state import STATE

SYSTEMS = [
    f"You are assistant number {i}. " + "Follow the house style guide carefully. " * 40 for i in range(4)
]
CHAT = "/v1/chat/completions"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def request_body(rng: random.Random, kind: str) -> dict:
    messages = [
        {"role": "system", "content": rng.choice(SYSTEMS)},
        {"role": "user", "content": f"Question {rng.randrange(10**9)}: say something short."},
    ]
    body: dict = {"messages": messages, "max_tokens": 8, "temperature": 0}
    if kind in ("stream", "abandon"):
        body["stream"] = True
    elif kind == "session":
        body["prompt_cache_key"] = f"{rng.randrange(10**12)}-" + "k" * 4096
    elif kind == "salt":
        body["cache_salt"] = f"guess-{rng.randrange(10**6)}"
    elif kind == "bad":
        body["temperature"] = rng.choice([-1, "hot", 1e300, None, [1]])
    elif kind == "huge":
        messages[1]["content"] = "overflow " * 300_000
    return body


async def client(session: aiohttp.ClientSession, base: str, stop: float, seed: int, tally: dict) -> None:
    rng = random.Random(seed)
    kinds = ["plain"] * 6 + ["stream"] * 3 + ["abandon", "session", "session", "salt", "bad", "huge"]
    while time.monotonic() < stop:
        kind = rng.choice(kinds)
        try:
            async with session.post(base + CHAT, json=request_body(rng, kind)) as r:
                if kind == "abandon" and r.status == 200:
                    await r.content.readline()
                    r.close()  # walk away mid-stream
                else:
                    await r.read()
                tally[f"{kind}:{r.status}"] = tally.get(f"{kind}:{r.status}", 0) + 1
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            tally[f"{kind}:{type(exc).__name__}"] = tally.get(f"{kind}:{type(exc).__name__}", 0) + 1


async def sample(session: aiohttp.ClientSession, app: web.Application, workers: list, t0: float) -> dict:
    state = app[STATE]
    stats = state.store.index.stats()
    row = {
        "t_s": round(time.monotonic() - t0),
        "index_blocks": stats.blocks,
        "index_approx": stats.approx_entries,
        "pins": state.shared.pin_count(),
        "gateway_rss_mb": round(rss_mb(os.getpid()), 1),
    }
    for i, w in enumerate(workers):
        async with session.get(w.url + "/get_load") as r:
            load = await r.json()
        load = load[0] if isinstance(load, list) else load  # one entry per data-parallel rank
        row[f"w{i}_used_pages"] = load["num_used_pages"]
        row[f"w{i}_cached_pages"] = load["num_cached_pages"]
        row[f"w{i}_rss_mb"] = round(rss_mb(w.process.pid), 1)
    return row


def check_bounded(rows: list[dict], slack: float, slack_mb: float) -> list[str]:
    """Problems found: a figure whose last-third peak exceeds its first-third peak by more than the slack."""
    third = max(1, len(rows) // 3)
    first, last = rows[:third], rows[-third:]
    problems = []
    for key in rows[0]:
        if key == "t_s":
            continue
        early, late = max(r[key] for r in first), max(r[key] for r in last)
        allowed = early * (1 + slack) + (slack_mb if key.endswith("_mb") else 0)
        if key.endswith("_pages") or key.startswith("index_") or key == "pins":
            continue  # pools, the index and pins fill up by design (until eviction or TTL): caps below
        if late > allowed:
            problems.append(f"{key}: {early} -> {late} (allowed {allowed:.1f})")
    if max(r["pins"] for r in rows) > MAX_LOCAL_PINS:
        problems.append("pins over MAX_LOCAL_PINS")
    if max(r["index_blocks"] for r in rows) > RadixIndexConfig().max_blocks:
        problems.append("index over max_blocks")
    return problems


async def main(args: argparse.Namespace) -> int:
    with engine_workers(
        args.workers, None, ["--kv-cache-tokens", "16384", "--max-batch-tokens", "256"], 300
    ) as ws:
        config = GatewayConfig(workers=tuple(w.url for w in ws), health_interval_s=1.0)
        app = create_app(config)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, **server_options(config))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        base = f"http://{host}:{port}"
        rows: list[dict] = []
        tally: dict = {}
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
                t0 = time.monotonic()
                stop = t0 + args.duration
                clients = [
                    asyncio.create_task(client(session, base, stop, seed, tally))
                    for seed in range(args.concurrency)
                ]
                try:
                    while time.monotonic() < stop:
                        await asyncio.sleep(args.sample_s)
                        rows.append(await sample(session, app, ws, t0))
                        print(json.dumps(rows[-1]), flush=True)
                    await asyncio.gather(*clients)
                    rows.append(await sample(session, app, ws, t0))
                finally:
                    for task in clients:
                        task.cancel()
                    await asyncio.gather(*clients, return_exceptions=True)
        finally:
            await runner.cleanup()
    print("outcomes:", json.dumps(dict(sorted(tally.items()))))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "outcomes": tally}, indent=1))
    problems = check_bounded(rows, args.slack, args.slack_mb)
    unexpected = {k: v for k, v in tally.items() if k.split(":")[1] in ("500", "502", "503")}
    if unexpected:
        problems.append(f"server errors: {unexpected}")
    for problem in problems:
        print("NOT BOUNDED:", problem)
    print("soak:", "FAILED" if problems else "ok", f"({len(rows)} samples over {args.duration:.0f} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--slack", type=float, default=0.25)
    parser.add_argument("--slack-mb", type=float, default=64.0)
    parser.add_argument("--json", default=None, help="also write the samples here")
    sys.exit(asyncio.run(main(parser.parse_args())))
