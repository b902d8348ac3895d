"""SLO-driven token budget vs static budgets: long prefills arriving during steady decodes, one run
(docs/benchmarks.md, "SLO-driven token budget").

    python scripts/bench_itl_slo.py [--threads 1] [--rounds 2] [--slo-factors 3,6] [--budgets 256,512,2048]

One engine per configuration, all on one loaded model (the bundled SmolLM2 unless ``--model``), run
in process (the engine's figures, not the HTTP stack's). The workload is the same for each: four
streams decode 128 tokens each after a 32-token prompt; while they run, three 2,000-token prompts
arrive (when the streams have 8, 40 and 72 tokens), each asking for one token. Configurations:
``--itl-slo-ms`` at each factor times the measured batch-4 decode step (the SLO runs keep a 2,048
cap), and each static ``--max-batch-tokens``. The default factors are 3 and 6, not less: a step that
carries the decodes also carries at least a page (16 tokens) of prefill, and on a CPU 16 prompt
tokens cost about as much as a whole decode step, so an SLO under ~2.5x that step cannot be met. Rounds interleave them (A B C D, A B C D), since the
machine's speed drifts. Reported per run:

* ITL p50 / p99 / max: the gaps between successive tokens of the decode streams;
* within each SLO: the share of those gaps within it (every run is scored against every SLO);
* prefill tok/s: the long prompts' tokens over the time from the first one's arrival to the last one's
  first token (how fast the prefill queue drains, decodes or not);
* prefill tok/s while decoding: prompt tokens computed in steps that carried decodes, over the time
  the decode streams ran (what the budget lets prefill have while it protects the decodes);
* mean TTFT of the long prompts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time
from dataclasses import dataclass, field, replace

from cache.api.sampling import SamplingParams
from engine.benchmark import time_steps
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.loader import LoadedModel, load_model
from engine.scheduler import Batch
from engine.sequence import Sequence

STREAMS, STREAM_PROMPT, STREAM_TOKENS = 4, 32, 128
LONG_PROMPT, LONG_ARRIVALS = 2000, (8, 40, 72)  # stream tokens at which each long prompt arrives
SLO_CAP = 2048


@dataclass
class Workload:
    stream_prompts: list[list[int]]
    long_prompts: list[list[int]]

    @classmethod
    def random(cls, vocab: int, seed: int = 0) -> Workload:
        rng = random.Random(seed)

        def prompt(n: int) -> list[int]:
            return [rng.randrange(100, vocab) for _ in range(n)]  # no special tokens

        return cls(
            [prompt(STREAM_PROMPT) for _ in range(STREAMS)], [prompt(LONG_PROMPT) for _ in LONG_ARRIVALS]
        )


@dataclass
class Trace:
    token_times: dict[Sequence, list[float]] = field(default_factory=dict)  # decode streams
    arrivals: dict[Sequence, float] = field(default_factory=dict)  # long prompts
    first_tokens: dict[Sequence, float] = field(default_factory=dict)
    steps: list[tuple[int, int, float]] = field(default_factory=list)  # (decodes, tokens, end time)


def run(engine: LLMEngine, workload: Workload) -> Trace:
    """Drive the workload through ``engine`` step by step; every time is ``time.perf_counter``."""
    trace = Trace()
    schedule = engine.scheduler.schedule
    shapes: list[tuple[int, int]] = []

    def recording() -> Batch | None:
        batch = schedule()
        if batch is not None:
            shapes.append((batch.num_decodes, batch.num_tokens))
        return batch

    engine.scheduler.schedule = recording  # type: ignore[method-assign]
    decode = SamplingParams(max_tokens=STREAM_TOKENS, temperature=0, ignore_eos=True)
    streams = [engine.make_sequence(f"s{i}", p, decode) for i, p in enumerate(workload.stream_prompts)]
    for s in streams:
        engine.add(s)
        trace.token_times[s] = []
    pending = list(zip(LONG_ARRIVALS, workload.long_prompts, strict=True))
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    while engine.scheduler.has_work():
        while pending and min(len(s.output_ids) for s in streams) >= pending[0][0]:
            _, prompt = pending.pop(0)
            seq = engine.make_sequence(f"long{len(trace.arrivals)}", prompt, one)
            engine.add(seq)
            trace.arrivals[seq] = time.perf_counter()
        stepped = engine.step()
        now = time.perf_counter()
        if shapes:
            trace.steps.append((*shapes.pop(), now))
        for seq in stepped:
            if seq in trace.token_times:
                trace.token_times[seq].append(now)
            elif seq in trace.arrivals and seq not in trace.first_tokens:
                trace.first_tokens[seq] = now
    assert not pending and all(len(t) == STREAM_TOKENS for t in trace.token_times.values())
    return trace


def summarize(trace: Trace, slos_ms: list[float]) -> dict[str, float]:
    gaps = sorted(b - a for times in trace.token_times.values() for a, b in itertools.pairwise(times))
    pct = statistics.quantiles(gaps, n=100, method="inclusive")
    first_decode = min(times[1] for times in trace.token_times.values())  # all streams decoding
    last_decode = max(times[-1] for times in trace.token_times.values())
    while_decoding = sum(
        tokens - decodes
        for decodes, tokens, end in trace.steps
        if decodes and first_decode < end <= last_decode
    )
    ttfts = [trace.first_tokens[s] - trace.arrivals[s] for s in trace.arrivals]
    drain = max(trace.first_tokens.values()) - min(trace.arrivals.values())
    return {
        "itl_p50_ms": round(pct[49] * 1e3, 1),
        "itl_p99_ms": round(pct[98] * 1e3, 1),
        "itl_max_ms": round(gaps[-1] * 1e3, 1),
        **{f"within_{ms}_ms": round(sum(g * 1e3 <= ms for g in gaps) / len(gaps), 3) for ms in slos_ms},
        "prefill_tok_s": round(LONG_PROMPT * len(ttfts) / drain, 1),
        "prefill_tok_s_while_decoding": round(while_decoding / (last_decode - first_decode), 1),
        "long_ttft_mean_s": round(statistics.fmean(ttfts), 2),
    }


def batch4_decode_step_s(config: EngineConfig, loaded: LoadedModel, workload: Workload) -> float:
    """Median step of four sequences decoding (nothing else in the step), after a warm-up."""
    engine = LLMEngine(config, loaded)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    seqs = [engine.make_sequence(f"w{i}", p, params) for i, p in enumerate(workload.stream_prompts)]
    for s in seqs:
        engine.add(s)
    while any(len(s.output_ids) < 8 for s in seqs):
        engine.step()
    return statistics.median(time_steps(engine))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--slo-factors", default="3,6", help="SLOs as multiples of the batch-4 decode step")
    parser.add_argument("--itl-slo-ms", type=float, default=None, help="one SLO instead of --slo-factors")
    parser.add_argument("--budgets", default="256,512,2048", help="static --max-batch-tokens to compare")
    args = parser.parse_args()

    base = EngineConfig(model=args.model, dtype=args.dtype, threads=args.threads, kv_cache_tokens=16384)
    loaded = load_model(base)
    workload = Workload.random(loaded.model.config.vocab_size)
    cap = replace(base, max_batch_tokens=SLO_CAP)
    run(LLMEngine(cap, loaded), Workload.random(loaded.model.config.vocab_size, seed=1))  # warm-up
    step_s = batch4_decode_step_s(base, loaded, workload)
    if args.itl_slo_ms is not None:
        slos_ms = [args.itl_slo_ms]
    else:
        slos_ms = [round(float(f) * step_s * 1e3, 1) for f in args.slo_factors.split(",")]
    print(json.dumps({"batch4_decode_step_ms": round(step_s * 1e3, 1), "slos_ms": slos_ms}), flush=True)
    configs = {f"slo {ms} ms": replace(cap, itl_slo_ms=ms) for ms in slos_ms}
    for budget in (int(b) for b in args.budgets.split(",")):
        configs[f"static {budget}"] = replace(base, max_batch_tokens=budget)
    rows: list[tuple[str, int, dict[str, float]]] = []
    for r in range(1, args.rounds + 1):
        for name, config in configs.items():
            engine = LLMEngine(config, loaded)
            summary = summarize(run(engine, workload), slos_ms)
            fit = engine.step_time.fit
            if config.itl_slo_ms is not None and fit is not None:
                summary["fit_fixed_ms"] = round(fit.fixed_s * 1e3, 2)
                summary["fit_per_token_ms"] = round(fit.per_token_s * 1e3, 4)
                summary["decode_step_factor"] = round(engine.step_time.decode_step_factor, 3)
            rows.append((name, r, summary))
            print(json.dumps({"config": name, "round": r, **summary}), flush=True)
    print(f"\nbatch-4 decode step {step_s * 1e3:.1f} ms\n")
    columns = ["itl_p50_ms", "itl_p99_ms", "itl_max_ms", *(f"within_{ms}_ms" for ms in slos_ms)]
    columns += ["prefill_tok_s", "prefill_tok_s_while_decoding", "long_ttft_mean_s"]
    print("| config | round | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for name, r, s in sorted(rows, key=lambda row: list(configs).index(row[0])):
        print(f"| {name} | {r} | " + " | ".join(str(s[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
