"""KV tier benchmark (a measurement, not a test): ``python -m engine.benchmark --tiers``.

A working set of long system prompts three times larger than the device pool, visited round-robin
(each request: a system prompt plus a fresh user turn, one output token). Measured side by side on
one loaded model: the cached-token ratio of the second round with a single pool (today) and with a
host tier; the TTFT of a host-tier hit and of a disk-tier hit (a restarted engine on the same
directory) against the cold TTFT of the same prompts.
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
import time

from cache.api.sampling import SamplingParams
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.loader import LoadedModel

ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


def _serve(engine: LLMEngine, prompt: list[int]) -> tuple[float, int]:
    """TTFT (one output token) and cached prompt tokens of one request on an idle engine."""
    seq = engine.make_sequence(f"t{time.monotonic_ns()}", prompt, ONE_TOKEN)
    start = time.perf_counter()
    engine.add(seq)
    while engine.scheduler.has_work():
        engine.step()
    return time.perf_counter() - start, seq.num_cached_prompt


def tier_benchmark(
    config: EngineConfig,
    loaded: LoadedModel,
    device_tokens: int = 1536,
    system_tokens: int = 768,
    user_tokens: int = 16,
) -> dict[str, float]:
    rng = random.Random(0)
    vocab = loaded.model.config.vocab_size
    num_prompts = 3 * device_tokens // system_tokens  # the working set: 3x the device pool
    systems = [[rng.randrange(100, vocab) for _ in range(system_tokens)] for _ in range(num_prompts)]

    def visit(engine: LLMEngine, rounds: int) -> tuple[list[float], int, int]:
        ttfts, cached, reusable = [], 0, 0
        for r in range(rounds):
            for system in systems:
                user = [rng.randrange(100, vocab) for _ in range(user_tokens)]
                ttft, hit = _serve(engine, system + user)
                if r > 0:
                    ttfts.append(ttft)
                    cached += hit
                    reusable += system_tokens // config.page_size * config.page_size
        return ttfts, cached, reusable

    base = dataclasses.replace(config, kv_cache_tokens=device_tokens, max_model_len=None)
    results: dict[str, float] = {
        "tiers_working_set_over_device_pool": num_prompts * system_tokens / device_tokens
    }
    single = LLMEngine(base, loaded)
    _serve(single, systems[0][:64])  # warm-up
    _, cached, reusable = visit(single, 2)
    results["tiers_single_pool_cached_ratio"] = round(cached / reusable, 3)
    with tempfile.TemporaryDirectory() as disk_dir:
        tiered_config = dataclasses.replace(
            base,
            enable_hierarchical_cache=True,
            hicache_ratio=4.0,
            hicache_write_policy="write_through",
            hicache_disk_dir=disk_dir,
        )
        tiered = LLMEngine(tiered_config, loaded)
        cold, _ = _serve(tiered, systems[0] + [101] * user_tokens)  # round 0 of the same prompt
        for system in systems[1:]:
            _serve(tiered, system + [101] * user_tokens)  # systems[0] is now host-only
        host_hit, host_cached = _serve(tiered, systems[0] + [102] * user_tokens)
        _, cached, reusable = visit(tiered, 2)
        results["tiers_host_cached_ratio"] = round(cached / reusable, 3)
        restarted = LLMEngine(tiered_config, loaded)
        disk_hit, disk_cached = _serve(restarted, systems[1] + [103] * user_tokens)
        cold_other, _ = _serve(LLMEngine(base, loaded), systems[1] + [103] * user_tokens)
    results.update(
        tiers_cold_ttft_ms=round(cold * 1e3, 1),
        tiers_host_hit_ttft_ms=round(host_hit * 1e3, 1),
        tiers_host_hit_cached_tokens=host_cached,
        tiers_host_hit_over_cold=round(host_hit / cold, 3),
        tiers_disk_cold_ttft_ms=round(cold_other * 1e3, 1),
        tiers_disk_hit_ttft_ms=round(disk_hit * 1e3, 1),
        tiers_disk_hit_cached_tokens=disk_cached,
        tiers_disk_hit_over_cold=round(disk_hit / cold_other, 3),
    )
    return results
