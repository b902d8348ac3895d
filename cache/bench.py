"""Benchmark (not a test): ``python -m cache.bench [--blocks N] [--workers W]``.

Prints: hashing time for an 8k-token prompt; match latency p50/p99 for 4k-token prompts (256 blocks) against
an index of ``--blocks`` blocks spread over ``--workers`` workers (queries are hash lists built with the
index, so cold in the CPU cache: pessimistic); the same for hashing plus matching a fresh prompt, as the
gateway does per request; memory per block (tracemalloc); snapshot dump/load times (Redis replicas write
them on the event loop); the time to clear one worker's entries.
Targets from issue #4: hashing 8k tokens <= 100 us, match p99 <= 200 us.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import tracemalloc

import numpy as np

from cache.index.radix_index import RadixIndex, RadixIndexConfig
from cache.index.snapshot import dump_index, load_index
from cache.wire.hashing import block_hashes, namespace_seed
from cache.wire.tiers import Tier


def _percentile(samples: list[float], q: float) -> float:
    return sorted(samples)[min(len(samples) - 1, int(q * len(samples)))]


def bench_hashing(repeats: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    seed = namespace_seed("bench-model", "tenant")
    as_list = rng.integers(0, 128_000, 8192).tolist()
    as_array = np.asarray(as_list, dtype=np.int64)
    out = []
    for ids in (as_list, as_array):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            block_hashes(ids, 16, seed=seed)
            times.append(time.perf_counter() - t0)
        out.append(_percentile(times, 0.5))
    return out[0], out[1]


def build_index(n_blocks: int, n_workers: int, chain_blocks: int = 256) -> tuple[RadixIndex, list[list[int]]]:
    """Chains of ``chain_blocks`` blocks (4k-token prompts); each chain on 1-3 workers, some host-tier."""
    rng = random.Random(0)
    index = RadixIndex(RadixIndexConfig(max_blocks=n_blocks + chain_blocks))
    chains: list[list[int]] = []
    seed = namespace_seed("bench-model")
    for c in range(n_blocks // chain_blocks):
        hashes = block_hashes(list(range(c * 10_000, c * 10_000 + chain_blocks * 16)), 16, seed=seed)
        for i, worker in enumerate(rng.sample(range(n_workers), rng.randint(1, 3))):
            held = chain_blocks if i == 0 else rng.randint(chain_blocks // 2, chain_blocks)
            tier = Tier.HOST if rng.random() < 0.2 else Tier.DEVICE
            index.stored(f"worker-{worker}", None, hashes[:held], tier)
        chains.append(hashes)
    return index, chains


def bench_match(
    index: RadixIndex, chains: list[list[int]], queries: int = 20_000
) -> tuple[list[float], list[float]]:
    """Wall-clock and thread-CPU times per match: on a loaded host, wall p99 includes preemption."""
    rng = random.Random(1)
    wall, cpu = [], []
    gc.collect()
    for _ in range(queries):
        query = rng.choice(chains)
        c0, t0 = time.thread_time(), time.perf_counter()
        index.match(query)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return wall, cpu


def bench_route(index: RadixIndex, n_chains: int, queries: int = 5_000) -> list[float]:
    """Hash a 4k-token prompt from a token list, then match it: the gateway's index work per request."""
    rng = random.Random(2)
    seed = namespace_seed("bench-model")
    prompts = [list(range(c * 10_000, c * 10_000 + 256 * 16)) for c in rng.sample(range(n_chains), 200)]
    wall = []
    gc.collect()
    for _ in range(queries):
        tokens = rng.choice(prompts)
        t0 = time.perf_counter()
        index.match(block_hashes(tokens, 16, seed=seed))
        wall.append(time.perf_counter() - t0)
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()

    list_p50, array_p50 = bench_hashing()
    print(
        f"hashing 8192 tokens (512 blocks): p50 {list_p50 * 1e6:.1f} us from a list, {array_p50 * 1e6:.1f} us from an ndarray"
    )

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    index, chains = build_index(args.blocks, args.workers)
    build_s = time.perf_counter() - t0
    held = tracemalloc.get_traced_memory()[0] - before
    # The chains' hash lists are the benchmark's own queries, not index memory.
    chains_bytes = sum(len(c) for c in chains) * (8 + 32) + len(chains) * 56
    tracemalloc.stop()
    n = len(index)
    print(f"index: {n} blocks over {args.workers} workers, built in {build_s:.1f} s")
    print(f"memory per block: {(held - chains_bytes) / n:.0f} bytes (tracemalloc, index structures only)")

    wall, cpu = bench_match(index, chains)
    for label, samples in (("wall", wall), ("thread cpu", cpu)):
        p50, p99 = _percentile(samples, 0.5), _percentile(samples, 0.99)
        print(f"match 4k-token prompt (256 blocks), {label}: p50 {p50 * 1e6:.1f} us, p99 {p99 * 1e6:.1f} us")
    route = bench_route(index, len(chains))
    p50, p99 = _percentile(route, 0.5), _percentile(route, 0.99)
    print(f"hash + match 4k-token prompt from a token list: p50 {p50 * 1e6:.1f} us, p99 {p99 * 1e6:.1f} us")
    t0 = time.perf_counter()
    blob = dump_index(index)
    t1 = time.perf_counter()
    load_index(blob)
    print(
        f"snapshot: dump {(t1 - t0) * 1e3:.0f} ms, load {(time.perf_counter() - t1) * 1e3:.0f} ms, "
        f"{len(blob) / 1e6:.1f} MB"
    )
    # Last, as it changes the index: what a worker restart, a KV-event gap or a cache flush costs the gateway.
    worker = max(index.stats().per_worker.items(), key=lambda item: sum(item[1]))[0]
    held = sum(index.stats().per_worker[worker])
    t0 = time.perf_counter()
    index.cleared(worker)
    print(f"clear one worker ({held} of {n} blocks): {(time.perf_counter() - t0) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
