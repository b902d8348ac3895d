"""Engine memory stays bounded under a flood of distinct values a client controls (pure, no model).

A prefix-cache root per ``cache_salt`` used to be kept forever: 10k distinct salts, 10k roots.
"""

from __future__ import annotations

import pytest

from cache.api.errors import ApiError
from cache.api.kv_fields import MAX_CACHE_SALT_CHARS, get_cache_salt
from cache.api.sampling import SamplingParams
from engine.kv.page_pool import PagePool
from engine.kv.prefix_cache import PrefixCache
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence

PAGE_SIZE = 4
NUM_PAGES = 32


def serve_one_request_per_salt(prompt_len: int, num_salts: int = 10_000) -> PrefixCache:
    """Run each request to completion through the real scheduler and prefix cache (the model is
    replaced by a constant token), every request under a salt of its own."""
    pool = PagePool(NUM_PAGES)
    cache = PrefixCache(pool, PAGE_SIZE, namespace_hash=lambda salt: hash(salt))
    scheduler = Scheduler(SchedulerConfig(PAGE_SIZE, max_batch_tokens=64, max_running=4), pool, cache)
    for i in range(num_salts):
        prompt = [(i * 7 + j) % 1000 for j in range(prompt_len)]
        scheduler.add(Sequence(f"r{i}", prompt, SamplingParams(max_tokens=2), cache_salt=f"tenant-{i}"))
        while scheduler.has_work():
            batch = scheduler.schedule()
            assert batch is not None
            scheduler.postprocess(batch, {c.seq: 7 for c in batch.chunks if c.samples})
    assert pool.num_used == cache.num_pages  # nothing leaked to finished requests
    return cache


@pytest.mark.parametrize("prompt_len", [3, 2 * PAGE_SIZE + 1], ids=["shorter_than_a_page", "whole_pages"])
def test_ten_thousand_salts_leave_the_number_of_roots_bounded(prompt_len: int) -> None:
    cache = serve_one_request_per_salt(prompt_len)
    assert len(cache.roots) <= 1 + NUM_PAGES  # the unsalted root + one per salt still holding a page
    assert all(root.children for salt, root in cache.roots.items() if salt)


def test_a_salted_namespace_still_hits_while_its_pages_are_cached() -> None:
    cache = PrefixCache(PagePool(NUM_PAGES), PAGE_SIZE)
    tokens = list(range(2 * PAGE_SIZE))
    pages, _ = cache.insert(tokens, cache.pool.alloc(2), "tenant")
    assert cache.match_prefix(tokens, "tenant")[0] == pages
    assert cache.evict(2) == 2 and "tenant" not in cache.roots
    assert cache.match_prefix(tokens, "tenant")[0] == [] and "tenant" not in cache.roots


def test_cache_salt_length_is_capped() -> None:
    assert get_cache_salt({"cache_salt": "s" * MAX_CACHE_SALT_CHARS}) == "s" * MAX_CACHE_SALT_CHARS
    with pytest.raises(ApiError) as refused:
        get_cache_salt({"cache_salt": "s" * (MAX_CACHE_SALT_CHARS + 1)})
    assert refused.value.status == 400 and refused.value.param == "cache_salt"
