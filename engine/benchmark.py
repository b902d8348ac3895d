"""Engine benchmark (a measurement, not a test): ``python -m engine.benchmark [--dtype ...]``.

Prints prefill tokens/s (1k and 2k prompts), aggregate decode tokens/s at several batch sizes,
and the TTFT of a 2,000-token prompt cold vs with its first 1,936 tokens already cached.
Runs the synchronous engine directly, so the figures are the engine's, not the HTTP stack's.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from cache.api.sampling import SamplingParams
from engine.config import EngineConfig
from engine.engine import LLMEngine


def random_prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(n)]  # skip the special tokens at the bottom


def run_to_completion(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> None:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add(engine.make_sequence(f"b{time.monotonic_ns()}-{i}", p, params))
    while engine.scheduler.has_work():
        engine.step()


def time_prefill(engine: LLMEngine, prompt: list[int]) -> float:
    engine.flush_cache()
    start = time.perf_counter()
    run_to_completion(engine, [prompt], max_tokens=1)
    return time.perf_counter() - start


def decode_throughput(engine: LLMEngine, rng: random.Random, batch: int, steps: int, vocab: int) -> float:
    """Aggregate decode tokens/s once every sequence is past its prefill."""
    engine.flush_cache()
    params = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    seqs = [
        engine.make_sequence(f"d{batch}-{i}", random_prompt(rng, 32, vocab), params) for i in range(batch)
    ]
    for s in seqs:
        engine.add(s)
    while any(not s.output_ids for s in seqs):  # prefill (and first token) of every sequence
        engine.step()
    start, produced = time.perf_counter(), sum(len(s.output_ids) for s in seqs)
    while engine.scheduler.has_work():
        engine.step()
    elapsed = time.perf_counter() - start
    return (sum(len(s.output_ids) for s in seqs) - produced) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args()

    engine = LLMEngine(
        EngineConfig(
            model=args.model, device=args.device, dtype=args.dtype, max_batch_tokens=args.max_batch_tokens
        )
    )
    vocab = engine.model.config.vocab_size
    rng = random.Random(0)
    results: dict[str, float | str] = {"device": engine.info.device, "dtype": engine.info.dtype}
    time_prefill(engine, random_prompt(rng, 256, vocab))  # warm-up: allocator, kernels

    for n in (1000, 2000):
        seconds = time_prefill(engine, random_prompt(rng, n, vocab))
        results[f"prefill_{n}_tok_s"] = round(n / seconds, 1)
    for b in (int(x) for x in args.batches.split(",")):
        results[f"decode_batch{b}_tok_s"] = round(
            decode_throughput(engine, rng, b, args.decode_steps, vocab), 1
        )

    prompt = random_prompt(rng, 2000, vocab)
    cold = time_prefill(engine, prompt)
    engine.flush_cache()
    run_to_completion(engine, [prompt[:1936]], max_tokens=1)  # cache 121 whole pages of the prefix
    start = time.perf_counter()
    run_to_completion(engine, [prompt], max_tokens=1)
    warm = time.perf_counter() - start
    results.update(ttft_2000_cold_ms=round(cold * 1e3, 1), ttft_2000_cached1936_ms=round(warm * 1e3, 1))
    results["ttft_cached_over_cold"] = round(warm / cold, 4)

    if args.json:
        print(json.dumps(results))
    else:
        for key, value in results.items():
            print(f"{key:28s} {value}")


if __name__ == "__main__":
    main()
