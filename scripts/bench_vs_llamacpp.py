"""prefixgate's engine next to llama.cpp on the same GGUF, same threads, in one process, interleaved.

    python scripts/bench_vs_llamacpp.py [--weights float,int4] [--threads 2] [--rounds 3] [--long-context 2000]

llama.cpp comes from llama-cpp-python, which is NOT a prefixgate dependency. Install it into the
venv when you want the comparison (it builds llama.cpp from source, ~6 minutes on 2 cores):

    pip install llama-cpp-python

Without it the script prints the engine's figures alone and says that llama.cpp was skipped.

Each round measures llama.cpp, then each engine mode, back to back: prefill of 1,000 and 2,000
random tokens (cold, one sequence), greedy decode at batch 1 after a 32-token prompt, and (engine
only: llama-cpp-python does not batch sequences) aggregate decode at batch 8; with ``--long-context
N``, decode at batch 1 after an N-token prompt too (what a long shared system prompt costs per token). The machine's speed
drifts, so figures are the median over rounds and every ratio is taken within one round.

llama.cpp runs in a child process of this script (same prompts, sent over a pipe): loaded next to
torch in one process, the two OpenMP runtimes crash llama.cpp's first ``eval``. So this module
imports torch and the engine only in the parent's ``main``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

PREFILLS = (1000, 2000)
PROMPT = 32  # tokens before decode starts


class LlamaCppWorker:
    """The child process: llama.cpp through llama-cpp-python's C bindings (what llama-bench does).

    The high-level ``Llama.eval`` is avoided: in 0.3.36 it crashes on a second call and keeps no
    logits unless every position's are kept."""

    def __init__(self, path: str, threads: int) -> None:
        import llama_cpp as lc  # optional; see the module docstring

        self.lc = lc
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(path.encode(), lc.llama_model_default_params())
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = 4096, 2048, 512  # prompts in 512-token ubatches
        params.n_threads = params.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, params)
        self.memory = lc.llama_get_memory(self.ctx)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))

    def _decode(self, tokens: list[int]) -> None:
        lc = self.lc
        ids = (lc.llama_token * len(tokens))(*tokens)
        if (rc := lc.llama_decode(self.ctx, lc.llama_batch_get_one(ids, len(tokens)))) != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def prefill_tok_s(self, tokens: list[int]) -> float:
        self.lc.llama_memory_clear(self.memory, True)
        start = time.perf_counter()
        self._decode(tokens)
        self._argmax()
        return len(tokens) / (time.perf_counter() - start)

    def decode_tok_s(self, prompt: list[int], steps: int) -> float:
        """Greedy single-stream decode: one ``llama_decode`` of one token per step, argmax of its logits."""
        self.lc.llama_memory_clear(self.memory, True)
        self._decode(prompt)
        token = self._argmax()
        start = time.perf_counter()
        for _ in range(steps):
            self._decode([token])
            token = self._argmax()
        return steps / (time.perf_counter() - start)


def serve_llama_cpp(path: str, threads: int) -> None:
    """Child: one JSON request per stdin line -> one JSON answer per stdout line."""
    try:
        worker = LlamaCppWorker(path, threads)
    except ImportError as exc:  # not installed, or one of its own imports is missing (e.g. diskcache)
        print(json.dumps({"error": f"llama-cpp-python does not import: {exc}"}), flush=True)
        return
    print(json.dumps({"version": __import__("llama_cpp").__version__}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "prefill":
            answer = worker.prefill_tok_s(req["tokens"])
        else:
            answer = worker.decode_tok_s(req["tokens"], req["steps"])
        print(json.dumps({"tok_s": answer}), flush=True)


class LlamaCpp:
    """The parent's handle on the child process."""

    def __init__(self, path: Path, threads: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--llama-cpp-worker", "--model", str(path), "--threads", str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # llama.cpp logs every tensor; failures show as the exit code
            text=True,
        )
        hello = self._read()
        if "error" in hello:
            self.proc.wait()
            raise ImportError(hello["error"])
        self.version = hello["version"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"llama.cpp worker exited with {self.proc.wait()}")
        return json.loads(line)

    def _ask(self, **request) -> float:
        self.proc.stdin.write(json.dumps(request) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self._read()["tok_s"]

    def prefill_tok_s(self, tokens: list[int]) -> float:
        return self._ask(op="prefill", tokens=tokens)

    def decode_tok_s(self, prompt: list[int], steps: int) -> float:
        return self._ask(op="decode", tokens=prompt, steps=steps)

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait()


def random_prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(n)]  # as engine.benchmark: no special tokens


def engine_round(engine, rng: random.Random, vocab: int, steps: int, long_context: int) -> dict[str, float]:
    from engine.benchmark import decode_throughput, time_prefill

    out = {f"prefill_{n}": n / time_prefill(engine, random_prompt(rng, n, vocab)) for n in PREFILLS}
    out["decode_b1"] = decode_throughput(engine, rng, 1, steps, vocab, PROMPT)
    out["decode_b8"] = decode_throughput(engine, rng, 8, steps, vocab, PROMPT)
    if long_context:
        out["decode_b1_long"] = decode_throughput(engine, rng, 1, steps, vocab, long_context)
    return out


def llama_round(
    llm: LlamaCpp, rng: random.Random, vocab: int, steps: int, long_context: int
) -> dict[str, float]:
    out = {f"prefill_{n}": llm.prefill_tok_s(random_prompt(rng, n, vocab)) for n in PREFILLS}
    out["decode_b1"] = llm.decode_tok_s(random_prompt(rng, PROMPT, vocab), steps)
    if long_context:
        out["decode_b1_long"] = llm.decode_tok_s(random_prompt(rng, long_context, vocab), steps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M Q4_1)")
    parser.add_argument("--weights", default="float,auto", help="engine modes to measure, comma-separated")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument(
        "--long-context",
        type=int,
        default=0,
        help="also decode at batch 1 after a prompt of this many tokens (a long shared prefix; < 3,900)",
    )
    parser.add_argument("--json", action="store_true", help="also print every round as JSON")
    parser.add_argument("--llama-cpp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llama_cpp_worker:
        return serve_llama_cpp(args.model, args.threads)

    import torch

    from cache.prompt.model_files import default_model_path
    from engine.benchmark import decode_throughput, time_prefill
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.loader import load_model

    path = Path(args.model) if args.model else default_model_path()
    torch.set_num_threads(args.threads)
    engines = {}
    for mode in args.weights.split(","):
        config = EngineConfig(model=str(path), dtype=args.dtype, weights=mode, threads=args.threads)
        loaded = load_model(config)
        engines[f"{mode} ({loaded.weights}, {str(loaded.dtype).removeprefix('torch.')})"] = LLMEngine(
            config, loaded
        )
    vocab = next(iter(engines.values())).model.config.vocab_size
    try:
        llama: LlamaCpp | None = LlamaCpp(path, args.threads)
    except ImportError as exc:
        llama = None
        print(f"llama.cpp skipped: {exc} (pip install llama-cpp-python)")

    rng = random.Random(0)
    for engine in engines.values():  # warm-up: allocator, kernels
        time_prefill(engine, random_prompt(rng, 256, vocab))
        decode_throughput(engine, rng, 1, 4, vocab)
    if llama is not None:
        llama.prefill_tok_s(random_prompt(rng, 256, vocab))

    rounds: list[dict[str, dict[str, float]]] = []
    for r in range(args.rounds):
        row: dict[str, dict[str, float]] = {}
        if llama is not None:
            row["llama.cpp"] = llama_round(llama, rng, vocab, args.decode_steps, args.long_context)
        for name, engine in engines.items():
            row[name] = engine_round(engine, rng, vocab, args.decode_steps, args.long_context)
        rounds.append(row)
        if args.json:
            print(json.dumps({"round": r, **row}))

    print(f"model {path.name}, {args.threads} threads, {args.rounds} rounds (median; ratios within a round)")
    if llama is not None:
        print(f"llama-cpp-python {llama.version}")
    decode = ["decode_b1", "decode_b8"] + (["decode_b1_long"] if args.long_context else [])
    heads = ["decode b1", "decode b8"] + ([f"b1 @{args.long_context}"] if args.long_context else [])
    print(
        f"{'':32s} {'prefill 1k':>11s} {'prefill 2k':>11s} "
        + " ".join(f"{h:>10s}" for h in heads)
        + "  tok/s"
    )
    for name in rounds[0]:
        figs = {k: statistics.median(rd[name][k] for rd in rounds) for k in rounds[0][name]}
        cells = [f"{figs.get(k, float('nan')):11.1f}" for k in ("prefill_1000", "prefill_2000")]
        cells += [f"{figs.get(k, float('nan')):10.1f}" for k in decode]
        print(f"{name:32s} {' '.join(cells)}")
        if llama is None or name == "llama.cpp":
            continue
        ratio = {
            k: statistics.median(rd[name][k] / rd["llama.cpp"][k] for rd in rounds)
            for k in ("prefill_1000", "prefill_2000", *decode)
            if k != "decode_b8"
        }
        ratio["decode_b8"] = statistics.median(
            rd[name]["decode_b8"] / rd["llama.cpp"]["decode_b1"] for rd in rounds
        )
        cells = [f"{ratio[k]:10.2f}x" for k in ("prefill_1000", "prefill_2000")]
        cells += [f"{ratio[k]:9.2f}x" for k in decode]
        print(f"{'  vs llama.cpp (b8: vs its b1)':32s} {' '.join(cells)}")
    if llama is not None:
        llama.close()


if __name__ == "__main__":
    main()
