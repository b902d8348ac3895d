"""End to end against a scripted SSE server on loopback: measured TTFT/ITL match the script's delays,
usage is parsed, errors are recorded, multi-turn history and sessions reach the server."""

from __future__ import annotations

import math

import pytest

from loadgen.metrics import compute_metrics
from loadgen.prompts import PromptRenderer, RequestOptions
from loadgen.runner import LoadConfig, make_session, poisson_arrivals, run_load
from loadgen.workloads import MultiTurnConfig, RandomConfig, build_multi_turn, build_random
from tests.loadgen.sse_stub import CALLS, Script, create_stub_app

# Loopback on a shared 2-core machine: the client may see a chunk late, never early.
EARLY_S, LATE_S = 0.005, 0.1


def make_renderer(tokenizer, vocab, endpoint):
    return PromptRenderer(
        tokenizer, vocab.separator_ids, RequestOptions(endpoint=endpoint, model="stub-model")
    )


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_measured_timeline_matches_script(aiohttp_server, tokenizer, vocab, endpoint):
    script = Script(first_delay_s=0.12, interval_s=0.04, content_chunks=4)
    server = await aiohttp_server(create_stub_app(script))
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    workload = build_random(RandomConfig(num_prompts=3, input_len=40, output_len=4), vocab)
    warmup = build_random(
        RandomConfig(num_prompts=1, input_len=8, output_len=2, seed=99), vocab
    ).conversations
    async with make_session() as session:
        result = await run_load(
            session,
            str(server.make_url(path)),
            workload,
            make_renderer(tokenizer, vocab, endpoint),
            LoadConfig(concurrency=3),
            warmup,
        )
    assert [r.warmup for r in result.records] == [True, False, False, False]
    for record in result.records[1:]:
        assert record.success, record.error
        assert record.http_status == 200
        assert 0.12 - EARLY_S <= record.ttft_s <= 0.12 + LATE_S  # the empty role chunk is not the first token
        assert len(record.itl_s) == 3
        assert all(0.04 - EARLY_S <= gap <= 0.04 + LATE_S for gap in record.itl_s)
        assert record.latency_s >= record.ttft_s + sum(record.itl_s) - 1e-9
        assert (record.usage_output_tokens, record.prompt_tokens, record.cached_tokens) == (4, 123, 64)
        assert record.generated_text == "tok0 tok1 tok2 tok3 "
        assert record.scheduled_s is None  # closed loop
    metrics = compute_metrics(result.records, result.duration_s)
    assert metrics["completed"] == 3
    assert metrics["cache_hit_rate"] == pytest.approx(64 / 123)
    assert 120 - 1000 * EARLY_S <= metrics["mean_ttft_ms"] <= 120 + 1000 * LATE_S
    calls = server.app[CALLS]
    assert len(calls.requests) == 4 and all(
        body["stream_options"]["include_usage"] for _, body, _ in calls.requests
    )


async def test_http_and_stream_errors_are_recorded(aiohttp_server, tokenizer, vocab):
    workload = build_random(RandomConfig(num_prompts=1, input_len=8, output_len=4), vocab)
    renderer = make_renderer(tokenizer, vocab, "chat")
    for script, expected in (
        (Script(status=503), "HTTP 503"),
        (Script(first_delay_s=0.0, interval_s=0.0, stream_error_after=2), "stream error"),
    ):
        server = await aiohttp_server(create_stub_app(script))
        async with make_session() as session:
            result = await run_load(
                session,
                str(server.make_url("/v1/chat/completions")),
                workload,
                renderer,
                LoadConfig(warmup_requests=0),
            )
        (record,) = result.records
        assert not record.success and expected in record.error
        if script.status == 503:
            assert record.http_status == 503 and "scripted failure" in record.error


async def test_multi_turn_open_loop_sends_history_and_sessions(aiohttp_server, tokenizer, vocab):
    script = Script(first_delay_s=0.01, interval_s=0.005, content_chunks=3)
    server = await aiohttp_server(create_stub_app(script))
    workload = build_multi_turn(
        MultiTurnConfig(
            num_conversations=2,
            turns_per_conversation=3,
            system_prompt_len=16,
            user_turn_len=8,
            output_len=3,
            think_time_s=0.02,
        ),
        vocab,
    )
    async with make_session() as session:
        result = await run_load(
            session,
            str(server.make_url("/v1/chat/completions")),
            workload,
            make_renderer(tokenizer, vocab, "chat"),
            LoadConfig(request_rate=50.0, warmup_requests=0, seed=3),
        )
    measured = [r for r in result.records if not r.warmup]
    assert len(measured) == 6 and all(r.success for r in measured)
    assert all(r.lateness_s is not None and r.lateness_s >= 0 for r in measured)
    assert {r.session_id for r in measured} == {c.session_id for c in workload.conversations}
    calls = server.app[CALLS].requests
    last_turns = [body for _, body, _ in calls if len(body["messages"]) == 6]
    assert len(last_turns) == 2
    for body in last_turns:
        assert [m["content"] for m in body["messages"] if m["role"] == "assistant"] == ["tok0 tok1 tok2 "] * 2
        assert body["user"] == body["prompt_cache_key"]
    assert all(headers["X-Session-ID"] == body["user"] for _, body, headers in calls)


async def test_num_prompts_caps_multi_turn(aiohttp_server, tokenizer, vocab):
    server = await aiohttp_server(
        create_stub_app(Script(first_delay_s=0.0, interval_s=0.0, content_chunks=2))
    )
    workload = build_multi_turn(
        MultiTurnConfig(
            num_conversations=3,
            turns_per_conversation=3,
            system_prompt_len=4,
            user_turn_len=4,
            output_len=2,
            think_time_s=0.0,
        ),
        vocab,
    )
    async with make_session() as session:
        result = await run_load(
            session,
            str(server.make_url("/v1/chat/completions")),
            workload,
            make_renderer(tokenizer, vocab, "chat"),
            LoadConfig(concurrency=1, num_prompts=4, warmup_requests=0),
        )
    assert len(result.records) == 4


def test_poisson_schedule_is_seeded():
    a = poisson_arrivals(1000, 10.0, seed=5)
    assert a[0] == 0.0 and (a == poisson_arrivals(1000, 10.0, seed=5)).all()
    assert a[-1] / 999 == pytest.approx(0.1, rel=0.15)
    assert (poisson_arrivals(3, math.inf, seed=5) == 0).all()
