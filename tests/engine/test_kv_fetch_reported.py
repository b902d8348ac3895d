"""What an engine tells of its fetches: the usage of an answer that ran a fetch plan
(``kv_fetched_tokens``, ``kv_fetch_seconds``: cache/api/replies.py ``KVFetch``), and the measured link
in ``GET /kv_transfer/info`` (``fetch_cost``: cache/planning/fetch_cost.py) the gateway weighs plans with.
Two real engine servers on loopback, Mooncake over TCP."""

from __future__ import annotations

import pytest

pytest.importorskip("mooncake.engine", reason="KV transfer needs mooncake-transfer-engine-non-cuda")

from cache.api.replies import KVFetch, reply_usage
from cache.planning.fetch_cost import FetchCost
from tests.engine.kv_transfer_helpers import Server, generate, http, plan_for
from tests.engine.test_kv_transfer import new_prompt, servers  # noqa: F401  (the pair of engines)

pytestmark = pytest.mark.slow


def fetch_cost(server: Server) -> FetchCost:
    cost = FetchCost.from_json(http("GET", f"{server.url}/kv_transfer/info")["fetch_cost"])
    assert cost is not None
    return cost


def test_an_answer_says_what_its_fetch_brought_and_the_link_is_measured(
    servers: tuple[Server, Server],  # noqa: F811
) -> None:
    a, b = servers
    before = fetch_cost(b)
    prompt = new_prompt(300)
    generate(a.url, prompt)  # A caches the prefix
    out = generate(b.url, prompt, plan_for(a, prompt))  # SGLang's API: meta_info
    usage = reply_usage(out)
    assert usage is not None and usage.kv_fetch is not None
    fetched = (len(prompt) - 1) // 16 * 16  # every whole page but a last token's
    assert usage.kv_fetch.tokens == usage.cached_tokens == fetched
    assert usage.kv_fetch.seconds is not None and usage.kv_fetch.seconds > 0
    after = fetch_cost(b)
    assert after.fetches == before.fetches + 1 and after.measured
    assert after.bytes_per_s > 0 and after.round_trip_s >= 0  # type: ignore[operator]

    # OpenAI's API: the same figures in usage.prompt_tokens_details; none without a plan.
    prompt = new_prompt(200)
    generate(a.url, prompt)
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "kv_fetch_plan": plan_for(a, prompt)}
    details = http("POST", f"{b.url}/v1/completions", body)["usage"]["prompt_tokens_details"]
    assert details["kv_fetched_tokens"] == details["cached_tokens"] == (len(prompt) - 1) // 16 * 16
    assert fetch_cost(b).fetches == after.fetches + 1
    plain = http("POST", f"{b.url}/v1/completions", {"prompt": new_prompt(40), "max_tokens": 1})
    assert set(plain["usage"]["prompt_tokens_details"]) == {"cached_tokens"}


def test_a_failed_fetch_reports_nothing_fetched_and_measures_nothing(
    servers: tuple[Server, Server],  # noqa: F811
) -> None:
    a, b = servers
    before = fetch_cost(b)
    prompt = new_prompt(200)
    generate(a.url, prompt)
    out = generate(b.url, prompt, plan_for(a, prompt, expires_at_ms=1))  # expired: recomputed
    usage = reply_usage(out)
    assert usage is not None and usage.kv_fetch == KVFetch(0, usage.kv_fetch.seconds)  # type: ignore[union-attr]
    assert usage.cached_tokens == 0
    assert fetch_cost(b) == before  # a failure says nothing of the link's speed
