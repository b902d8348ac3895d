"""Cascade attention on and off, in one engine: decodes that share a cached prefix.

    python scripts/bench_cascade.py --rows 8 --prefix 2000 [--weights int4] [--dtype bfloat16] [--rounds 2]

One sequence caches a ``--prefix``-token random prompt, then ``--rows`` sequences with it plus 16 own
tokens each decode ``--steps`` steps, first with ``ModelRunner.cascade`` off (each row attends to all
its keys), then on (for any shared pages, whatever the engine's ``cascade_min`` thresholds say): in
the fused decode step, or with ``--no-fused-decode`` on the Python path. ``--rounds`` times, in one
process, so both see the same machine. Prints the median step time of each and whether the greedy
outputs agree (they do in fp32; in bf16 any change of batch shape may flip a near-tie).
"""

from __future__ import annotations

import argparse
import random
import statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prefix", type=int, default=2000)
    parser.add_argument("--weights", default="int4")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--no-fused-decode",
        dest="fused_decode",
        action="store_false",
        help="rows attending to all their keys take the Python path (the default: the fused decode step)",
    )
    args = parser.parse_args()

    from cache.api.sampling import SamplingParams
    from engine.benchmark import time_steps
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.loader import load_model

    config = EngineConfig(
        dtype=args.dtype,
        weights=args.weights,
        threads=args.threads,
        kv_cache_tokens=32768,
        fused_decode=args.fused_decode,
    )
    engine = LLMEngine(config, load_model(config))
    vocab = engine.model.config.vocab_size
    prefix = [random.Random(0).randrange(100, vocab) for _ in range(args.prefix)]

    def run(cascade: bool, seed: int) -> tuple[list[list[int]], float]:
        engine.flush_cache()
        engine.runner.cascade = cascade
        engine.runner.cascade_min = (2, engine.config.page_size)  # measure it wherever it is asked for
        engine.add(engine.make_sequence(f"warm-{cascade}", prefix, SamplingParams(max_tokens=1)))
        while engine.scheduler.has_work():  # the prefix is cached now
            engine.step()
        rng = random.Random(seed)
        greedy = SamplingParams(max_tokens=args.steps + 1, temperature=0, ignore_eos=True)
        seqs = [
            engine.make_sequence(
                f"r{i}-{cascade}", prefix + [rng.randrange(100, vocab) for _ in range(16)], greedy
            )
            for i in range(args.rows)
        ]
        for s in seqs:
            engine.add(s)
        while any(not s.output_ids for s in seqs):
            engine.step()
        return [s.output_ids for s in seqs], statistics.median(time_steps(engine))

    for r in range(args.rounds):
        plain, t_plain = run(False, r)
        cascade, t_cascade = run(True, r)
        print(
            f"{args.dtype} {args.weights}, {args.rows} rows on a {args.prefix}-token shared prefix: "
            f"each row all its keys {t_plain * 1e3:.1f} ms/step ({args.rows / t_plain:.0f} tok/s), "
            f"cascade {t_cascade * 1e3:.1f} ms/step ({args.rows / t_cascade:.0f} tok/s), "
            f"{t_plain / t_cascade:.2f}x; same greedy outputs: {plain == cascade}"
        )


if __name__ == "__main__":
    main()
