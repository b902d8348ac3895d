"""KV tiers with the real SmolLM2 (fp32): greedy outputs are token-identical whether a prefix came from
the device, from host memory after a demotion, or from the disk tier after a restart; a corrupt page
file is recomputed."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cache.api.sampling import SamplingParams
from cache.planning.load_profile import LoadProfile
from cache.wire.tiers import MEDIUM_DISK, MEDIUM_HOST, Tier
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.kv.disk_store import SUFFIX
from engine.sequence import Sequence
from tests.engine.test_scheduler import check_invariants

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def tiered_engine(model, path: Path, disk_dir: Path) -> LLMEngine:
    config = EngineConfig(
        model=str(path),
        dtype="float32",
        kv_cache_tokens=1024,
        enable_hierarchical_cache=True,
        hicache_ratio=4.0,
        hicache_disk_dir=str(disk_dir),
    )
    return LLMEngine(config, model)


def generate(engine: LLMEngine, request_id: str, prompt: list[int]) -> Sequence:
    seq = engine.make_sequence(request_id, prompt, GREEDY)
    engine.add(seq)
    while engine.scheduler.has_work():
        engine.step()
        check_invariants(engine.scheduler)
    return seq


def test_outputs_are_identical_from_every_tier(smollm2_model, smollm2_gguf_path, tmp_path: Path) -> None:
    engine = tiered_engine(smollm2_model, smollm2_gguf_path, tmp_path)
    rng = random.Random(0)
    vocab = engine.model.config.vocab_size
    prompt = [rng.randrange(100, vocab) for _ in range(400)]
    assert engine.stats().load_profile.kv_load.prefill_s_per_token is None  # nothing computed yet
    cold = generate(engine, "cold", prompt)
    measured = engine.stats().load_profile.kv_load  # what GET /load_profile shows the gateway
    assert measured.prefill_s_per_token and measured.host_s_per_token and measured.disk_s_per_token is None
    assert 0 <= measured.saved_fraction(Tier.HOST) <= 1
    device = generate(engine, "device", prompt)
    assert device.num_cached_prompt >= 384 and device.output_ids == cold.output_ids
    for i in range(3):  # 3 x 400 tokens through a 1,024-token pool: the prompt is demoted to host
        generate(engine, f"other{i}", [rng.randrange(100, vocab) for _ in range(400)])
    host = generate(engine, "host", prompt)
    assert engine.lower.loaded_tokens[MEDIUM_HOST] > 0 and host.num_cached_prompt >= 384
    assert host.output_ids == cold.output_ids

    restarted = tiered_engine(smollm2_model, smollm2_gguf_path, tmp_path)
    disk = generate(restarted, "disk", prompt)
    assert restarted.lower.loaded_tokens[MEDIUM_DISK] > 0 and disk.num_cached_prompt >= 384
    profile = LoadProfile.from_json(restarted.stats().load_profile.to_json())
    assert profile is not None and profile.kv_load.disk_s_per_token  # measured by reading the page files
    assert disk.output_ids == cold.output_ids

    for page_file in tmp_path.glob(f"*{SUFFIX}"):  # every page file damaged
        data = bytearray(page_file.read_bytes())
        data[-100] ^= 0xFF
        page_file.write_bytes(bytes(data))
    damaged = tiered_engine(smollm2_model, smollm2_gguf_path, tmp_path)
    recomputed = generate(damaged, "recomputed", prompt)
    assert recomputed.num_cached_prompt == 0 and recomputed.output_ids == cold.output_ids
