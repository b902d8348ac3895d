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

import torch

from cache.api.sampling import SamplingParams
from engine.benchmark_tiers import tier_benchmark
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.loader import load_model


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


def time_steps(engine: LLMEngine) -> list[float]:
    """Step ``engine`` until it has no work left; the seconds of each step."""
    times = []
    while engine.scheduler.has_work():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times


def decode_throughput(
    engine: LLMEngine, rng: random.Random, batch: int, steps: int, vocab: int, prompt_tokens: int = 32
) -> float:
    """Aggregate decode tokens/s once every sequence is past its prefill of ``prompt_tokens`` tokens."""
    engine.flush_cache()
    params = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    seqs = [
        engine.make_sequence(f"d{batch}-{i}", random_prompt(rng, prompt_tokens, vocab), params)
        for i in range(batch)
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


def _report(results: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(results))
    else:
        for key, value in results.items():
            print(f"{key:36s} {value}")


def weight_bytes_per_decode_step(model: torch.nn.Module) -> int:
    """Bytes of the weights a batch-1 decode step reads: the matmul weights in the form small batches
    use, the norms, and one embedding row (the tied LM head is counted once, as a matmul)."""
    from engine.models.cpu_linear import PackedLinear
    from engine.models.quant_linear import QuantizedLinear

    total = 0
    for module in model.modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if isinstance(module, PackedLinear):  # oneDNN's packed weight is a plain attribute
            own.append(("packed", module.packed))
        if isinstance(module, QuantizedLinear):
            own = [(n, t) for n, t in own if n != "dense"]
        elif isinstance(module, torch.nn.Embedding):
            continue
        total += sum(t.numel() * t.element_size() for n, t in own if n not in ("cos", "sin"))
    cfg = model.config
    if getattr(model, "packed_head", None) is None and model.lm_head is None:  # tied, read as the head
        total += model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total + cfg.hidden_size * model.embed_tokens.weight.element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--weights", default="auto", help="auto | float | int8 | int4 (see EngineConfig)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA too")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    parser.add_argument(
        "--tiers", action="store_true", help="only the KV tier section (engine.benchmark_tiers)"
    )
    args = parser.parse_args()

    config = EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        weights=args.weights,
        threads=args.threads,
        max_batch_tokens=args.max_batch_tokens,
    )
    loaded = load_model(config)
    if args.tiers:
        _report(tier_benchmark(config, loaded), args.json)
        return
    engine = LLMEngine(config, loaded)
    engine.runner.cuda_graphs = engine.runner.cuda_graphs and not args.no_cuda_graphs
    vocab = engine.model.config.vocab_size
    rng = random.Random(0)
    results: dict[str, float | str] = {
        "device": engine.info.device,
        "dtype": engine.info.dtype,
        "weights": loaded.weights,
        "cuda_graphs": engine.runner.cuda_graphs,
        # what one decode step reads at least: every weight once (the quantized modes also keep a
        # dense copy for large batches, which batch-1 steps do not read)
        "weight_bytes_read_per_step": weight_bytes_per_decode_step(loaded.model),
    }
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
