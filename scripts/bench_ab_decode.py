"""Before/after decode speed of two source trees, paired: two engines take turns on the same machine.

    git worktree add /tmp/before <rev>
    python scripts/bench_ab_decode.py /tmp/before . --weights int4 --batch 1 [--context 32] [--rounds 10]

This machine's speed drifts by a third from minute to minute, so two benchmark runs one after the
other can differ by more than the change being measured. Here each tree runs in its own process
(engine loaded, sequences decoding), and the two take turns running ``--steps`` decode steps,
``--rounds`` times, alternating which goes first: both see the same drift. It prints each tree's
median step time and the ratio of the two (> 1: the second tree is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def serve(root: str, weights: str, batch: int, context: int) -> None:
    """The child: an engine from ``root`` with ``batch`` sequences decoding; each line on stdin asks
    for that many steps, answered with their times as a JSON list."""
    sys.path.insert(0, root)
    import random
    import time

    from cache.api.sampling import SamplingParams
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.loader import load_model

    config = EngineConfig(dtype="bfloat16", weights=weights, threads=2)
    engine = LLMEngine(config, load_model(config))
    rng = random.Random(0)
    params = SamplingParams(max_tokens=10**6, temperature=0, ignore_eos=True)
    seqs = [
        engine.make_sequence(f"ab{i}", [rng.randrange(100, 49000) for _ in range(context)], params)
        for i in range(batch)
    ]
    for s in seqs:
        engine.add(s)
    while any(not s.output_ids for s in seqs):
        engine.step()
    for _ in range(5):
        engine.step()
    print("ready", flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        print(json.dumps(times), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="source tree A (e.g. a git worktree of the old revision)")
    parser.add_argument("after", help="source tree B")
    parser.add_argument("--weights", default="int4")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=32, help="prompt tokens before decoding")
    parser.add_argument("--steps", type=int, default=20, help="decode steps per turn")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        return serve(args.serve, args.weights, args.batch, args.context)

    trees = {"A": args.before, "B": args.after}
    procs = {}
    for name, root in trees.items():
        cmd = [sys.executable, __file__, root, root, "--serve", root, "--weights", args.weights]
        cmd += ["--batch", str(args.batch), "--context", str(args.context)]
        # Each tree compiles its own fused decode extension: one build directory for two sources would
        # have the second tree rebuild it under the first one's running engine.
        ext_dir = Path(tempfile.gettempdir(), "prefixgate-ab-ext", Path(root).resolve().as_posix().strip("/"))
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext_dir)}
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root, env=env
        )
        while (line := proc.stdout.readline()) and line.strip() != "ready":
            pass
        if not line:
            raise SystemExit(f"the engine from {root} did not start")
        procs[name] = proc
    times: dict[str, list[float]] = {"A": [], "B": []}
    for r in range(args.rounds):
        for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
            proc = procs[name]
            proc.stdin.write(f"{args.steps}\n")
            proc.stdin.flush()
            times[name] += json.loads(proc.stdout.readline())
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"{args.weights} batch {args.batch}, {args.context}-token prompts, {len(times['A'])} steps each: "
        + "  ".join(
            f"{name} ({trees[name]}) {median[name] * 1e3:.2f} ms/step = {args.batch / median[name]:.1f} tok/s"
            for name in trees
        )
        + f"  B/A speed {median['A'] / median['B']:.3f}x"
    )


if __name__ == "__main__":
    main()
