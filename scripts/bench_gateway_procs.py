"""What a second gateway process buys: ``python scripts/bench_gateway_procs.py [--rounds 2] [--seconds 10]``.

Everything on loopback: an instant upstream (a stub worker in its own process that streams a short answer
at once, so all the time spent is the gateway's and the client's), a scratch ``redis-server``, and
``prefixgate gateway --procs N --redis ...`` for N = 1 and 2 in turn, both with the same Redis, so that
only the process count differs (and, for what sharing costs, one process without Redis). For each target
(the stub directly, then each gateway, in an order that alternates between rounds) it measures, in every
round:

* throughput: ``--concurrency`` clients on keep-alive connections (SO_REUSEPORT spreads connections over
  the processes) send streamed chat requests for ``--seconds``: requests/s, and latency p50/p99;
* added latency: one client, one request at a time (``--sequential`` requests): the gateway's p50 minus
  the stub's own p50 in the same round is what the gateway adds to a request.

The client runs in this process, on the same cores as what it measures; on a small machine it is part of
what saturates, so compare the targets within one run, not with figures from another machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.launcher import free_port  # noqa: E402

CHAT = "/v1/chat/completions"
SYSTEM = "You are a careful assistant. Answer in one short sentence, and follow the house style guide. " * 8
PIECES = ["Hello", ",", " world", "."]


# ---- the instant upstream ------------------------------------------------------------------------------
def stub_app() -> web.Application:
    """An OpenAI-compatible worker that answers every chat at once: a few chunks, usage, [DONE]."""

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    async def complete(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(PIECES)}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return web.json_response({"object": "chat.completion", "choices": [choice], "usage": usage()})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunks = [{"choices": [{"index": 0, "delta": {"content": p}}]} for p in PIECES]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage()})
        await response.write(b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def usage() -> dict:
        return {"prompt_tokens": 200, "completion_tokens": len(PIECES), "total_tokens": 200 + len(PIECES)}

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", lambda _: web.Response(text="ok"))
    app.router.add_post(CHAT, complete)
    return app


# ---- the client ----------------------------------------------------------------------------------------
def request_body(rng: random.Random) -> dict:
    question = f"Question {rng.randrange(10**9)}: what is {rng.randrange(1000)} + {rng.randrange(1000)}?"
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return {"model": "stub", "messages": messages, "max_tokens": 8, "stream": True}


async def one_request(session: aiohttp.ClientSession, url: str, body: dict) -> float | None:
    """Seconds to the end of the stream, or None for a failure."""
    start = time.perf_counter()
    try:
        async with session.post(url + CHAT, json=body) as r:
            data = await r.read()
            if r.status != 200 or not data.rstrip().endswith(b"[DONE]"):
                return None
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
    return time.perf_counter() - start


async def throughput(url: str, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    failures = 0

    async def client(session: aiohttp.ClientSession, seed: int, stop: float) -> None:
        nonlocal failures
        rng = random.Random(seed)
        while time.perf_counter() < stop:
            took = await one_request(session, url, request_body(rng))
            if took is None:
                failures += 1
            else:
                latencies.append(took)

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        stop = start + seconds
        await asyncio.gather(*(client(session, i, stop) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"rps": len(latencies) / elapsed, "failures": failures, **percentiles(latencies)}


async def sequential(url: str, count: int) -> dict:
    rng, latencies, failures = random.Random(1), [], 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for _ in range(count):
            took = await one_request(session, url, request_body(rng))
            if took is None:
                failures += 1
            else:
                latencies.append(took)
    return {"failures": failures, **percentiles(latencies)}


def percentiles(latencies: list[float]) -> dict:
    if len(latencies) < 2:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    cuts = statistics.quantiles(latencies, n=100)
    return {"p50_ms": cuts[49] * 1000, "p99_ms": cuts[98] * 1000}


# ---- the processes -------------------------------------------------------------------------------------
@contextlib.contextmanager
def process(cmd: list[str], log: Path) -> Iterator[subprocess.Popen]:
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def wait_ready(url: str, path: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 180  # a gateway process loads its tokenizer first
    async with aiohttp.ClientSession() as session:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args} exited:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url + path) as r:
                    if r.status == 200:
                        return
            if time.monotonic() > deadline:
                raise SystemExit(f"{url}{path} never answered:\n{log.read_text()[-4000:]}")
            await asyncio.sleep(0.2)


async def measure(url: str, args: argparse.Namespace) -> dict:
    await throughput(url, args.concurrency, 1.0)  # warm-up: connections, caches, every process
    result = await throughput(url, args.concurrency, args.seconds)
    result["sequential"] = await sequential(url, args.sequential)
    result["load"] = os.getloadavg()[0]  # the machine's 1-minute load average as the run ended
    return result


GATEWAYS = {  # target -> (processes, shares through Redis)
    "gateway --procs 1, no Redis": (1, False),
    "gateway --procs 1": (1, True),
    "gateway --procs 2": (2, True),
}


async def run(args: argparse.Namespace, workdir: Path) -> list[dict]:
    log = workdir / "processes.log"
    stub_port, redis_port = free_port(), free_port()
    stub_url, redis_url = f"http://127.0.0.1:{stub_port}", f"redis://127.0.0.1:{redis_port}/0"
    redis_cmd = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""]
    redis_cmd += ["--appendonly", "no", "--dir", str(workdir)]
    stub_cmd = [sys.executable, __file__, "--stub-port", str(stub_port)]
    rows: list[dict] = []
    with process(redis_cmd, log), process(stub_cmd, log) as stub:
        await wait_ready(stub_url, "/v1/models", stub, log)
        for round_ in range(1, args.rounds + 1):
            direct = {"round": round_, "target": "stub directly", **await measure(stub_url, args)}
            rows.append(direct)
            order = list(GATEWAYS) if round_ % 2 else list(GATEWAYS)[::-1]  # so that drift favours none
            for target in order:
                procs, shared = GATEWAYS[target]
                port = free_port()
                cmd = [sys.executable, "-m", "gateway.cli", "--log-level", "warning", "gateway"]
                cmd += ["--procs", str(procs), "--port", str(port), "--worker", stub_url]
                if shared:
                    cmd += ["--redis", redis_url, "--redis-key-prefix", f"bench-{round_}-{procs}:"]
                with process(cmd, log) as gateway:
                    url = f"http://127.0.0.1:{port}"
                    await wait_ready(url, "/health", gateway, log)
                    rows.append({"round": round_, "target": target, **await measure(url, args)})
            for row in rows[-len(GATEWAYS) - 1 :]:
                row["added_ms"] = row["sequential"]["p50_ms"] - direct["sequential"]["p50_ms"]
            print_rows(rows[-len(GATEWAYS) - 1 :], file=sys.stderr)  # progress, round by round
    return rows


def print_rows(rows: list[dict], file: object = sys.stdout) -> None:
    print(
        "| round | target | requests/s | p50 ms | p99 ms | one at a time p50 ms | added ms | load |",
        file=file,
    )
    print("|---|---|---|---|---|---|---|---|", file=file)
    for r in rows:
        failures = r["failures"] + r["sequential"]["failures"]
        print(
            f"| {r['round']} | {r['target']} | {r['rps']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['sequential']['p50_ms']:.2f} | {r['added_ms']:.2f} | {r['load']:.1f} |"
            + (f" {failures} failed" if failures else ""),
            file=file,
        )


def print_medians(rows: list[dict]) -> None:
    print("| target (median of the rounds) | requests/s | p50 ms | p99 ms | added ms |")
    print("|---|---|---|---|---|")
    for target in ["stub directly", *GATEWAYS]:
        mine = [r for r in rows if r["target"] == target]
        med = {k: statistics.median(r[k] for r in mine) for k in ("rps", "p50_ms", "p99_ms", "added_ms")}
        print(
            f"| {target} | {med['rps']:,.0f} | {med['p50_ms']:.1f} | {med['p99_ms']:.1f} | {med['added_ms']:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each throughput run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sequential", type=int, default=300, help="requests of the added-latency run")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    parser.add_argument("--stub-port", type=int, help=argparse.SUPPRESS)  # internal: be the stub
    args = parser.parse_args()
    if args.stub_port:
        web.run_app(stub_app(), host="127.0.0.1", port=args.stub_port, print=None, access_log=None)
        return
    with tempfile.TemporaryDirectory(prefix="bench-procs-") as tmp:
        rows = asyncio.run(run(args, Path(tmp)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"{os.cpu_count()} CPUs; concurrency {args.concurrency}, {args.seconds:g} s per throughput run")
    print_rows(rows)
    print()
    print_medians(rows)


if __name__ == "__main__":
    main()
