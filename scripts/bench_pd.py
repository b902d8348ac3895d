"""Prefill/decode disaggregation side by side: 1 prefill + 1 decode worker vs 2 mixed workers, the same
two workloads at the same request rate, one run (docs/benchmarks.md, "Disaggregation").

    python scripts/bench_pd.py [--rate 0.5] [--out /tmp/bench-pd]

Each setup is a real `prefixgate serve` (embedded engines on the bundled model); each workload a real
`prefixgate bench` against it. Prints one markdown table: TTFT and ITL p50/p99 and goodput under the
TTFT and TPOT targets.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from gateway.launcher import free_port, spawn, stop_processes

ENGINE_ARGS = ["--engine-arg=--kv-cache-tokens=16384", "--engine-arg=--max-batch-tokens=256"]
SETUPS = {
    "1P+1D": ["--prefill-workers", "1", "--decode-workers", "1"],
    "2 mixed": ["--workers", "2"],
}
WORKLOADS = {  # long prompts with short answers; chat with long answers
    "long-doc": [
        "--workload", "long-doc-qa", "--doc-num-documents", "4", "--doc-len", "1024",
        "--doc-questions-per-document", "3", "--doc-question-len", "32", "--doc-output-len", "16",
    ],
    "chat, long answers": [
        "--workload", "random", "--random-num-prompts", "12", "--random-input-len", "384",
        "--random-output-len", "128",
    ],
}  # fmt: skip


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/stats", timeout=5) as r:
                workers = json.load(r)["workers"]
                if workers and all(w["healthy"] for w in workers):
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit("serve did not become ready")


def run(args: argparse.Namespace) -> list[tuple[str, str, dict]]:
    results = []
    for setup, flags in SETUPS.items():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), *flags, *ENGINE_ARGS]
        serve = spawn(cmd, subprocess.DEVNULL)  # its own process group: stopped with its engines
        try:
            wait_ready(url, serve)
            for workload, wflags in WORKLOADS.items():
                out = args.out / f"{setup}-{workload}".replace(" ", "_").replace(",", "").replace("+", "")
                bench = [
                    sys.executable, "-m", "gateway.cli", "bench", "--base-url", url, "--no-plots",
                    "--request-rate", str(args.rate), "--slo", f"ttft:{args.ttft_ms}", f"tpot:{args.tpot_ms}",
                    "--output-dir", str(out), "--seed", "1", *wflags,
                ]  # fmt: skip
                subprocess.run(bench, check=True, stdout=subprocess.DEVNULL)
                runs = [p for p in out.glob("*.json") if p.name != "summary.json"]
                results.append((setup, workload, json.loads(runs[0].read_text())))
        finally:
            stop_processes([serve])
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=0.5, help="requests/s, the same for every setup")
    p.add_argument("--ttft-ms", type=float, default=2000)
    p.add_argument("--tpot-ms", type=float, default=100)
    p.add_argument("--out", type=Path, default=Path("/tmp/bench-pd"))
    args = p.parse_args()
    rows = run(args)
    print(
        f"rate {args.rate} req/s; goodput under TTFT <= {args.ttft_ms:.0f} ms and TPOT <= {args.tpot_ms:.0f} ms"
    )
    print("| workload | setup | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | goodput req/s | completed |")
    print("|---|---|---|---|---|---|---|---|")
    for setup, workload, m in sorted(rows, key=lambda r: r[1]):
        print(
            f"| {workload} | {setup} | {m['median_ttft_ms']:.0f} ms | {m['p99_ttft_ms']:.0f} ms "
            f"| {m['median_itl_ms']:.1f} ms | {m['p99_itl_ms']:.1f} ms | {m.get('goodput') or 0:.2f} "
            f"| {m['completed']} |"
        )


if __name__ == "__main__":
    main()
