"""The P:D advice ``prefixgate bench`` prints for a recorded run, on hand-made timelines."""

from __future__ import annotations

import orjson
import pytest

from cache.planning.load_profile import DecodePoint, LoadProfile
from cache.planning.pd_advice import SLO, advise
from loadgen import __main__ as loadgen_main
from loadgen.client import RequestRecord
from loadgen.pd_estimate import advice_slo, format_advice, prefill_rate, run_advice, run_workload
from tests.loadgen.sse_stub import Script, stub_server_in_thread
from tests.loadgen.test_cli import SMALL_SHARED_PREFIX


def request(
    i: int, prompt: int, cached: int, ttft: float, tokens: int = 101, tpot: float = 0.02
) -> RequestRecord:
    """One streamed request: first token at ``ttft``, then one token every ``tpot`` seconds."""
    r = RequestRecord(request_id=i, success=True, prompt_tokens=prompt, cached_tokens=cached)
    r.usage_output_tokens = tokens
    r.chunk_offsets_s = [ttft + k * tpot for k in range(tokens)]
    r.chunk_has_content = [True] * tokens
    r.end_offset_s = r.chunk_offsets_s[-1]
    return r


def varied_run() -> list[RequestRecord]:
    # 20 requests in 10 s; uncached prompt parts 1000..2900 tokens (prompt minus 500 cached) prefilled at
    # 4000 tok/s after a fixed 50 ms; 101 output tokens at 20 ms each: 2 s of decoding per request.
    return [request(i, 1500 + 100 * i, 500, 0.05 + (1000 + 100 * i) / 4000) for i in range(20)]


def test_the_run_gives_the_workload_and_both_speeds() -> None:
    records = varied_run()
    workload = run_workload(records, 10.0)
    assert workload.request_rate == 2.0
    assert workload.mean_prefill_tokens == 1950 and workload.mean_output_tokens == 101
    rate, method = prefill_rate(records)
    assert rate == pytest.approx(4000) and method.startswith("slope")  # the 50 ms intercept is not prefill
    advice = run_advice(records, 10.0, SLO(1.0, 0.05))
    assert advice is not None
    # decode concurrency: 20 x 2 s of decoding over 10 s = 4 sequences on the one worker, 20 ms a step
    assert advice["profile"]["decode"] == [
        {"batch": pytest.approx(4.0), "step_s": pytest.approx(0.02), "steps": 20}
    ]
    # the advisor on exactly these figures: P = ceil(2 x 1950 / 4000) = 1; the decode point is the
    # only one, 4 / 0.02 = 200 tok/s a worker, against 2 x 101 = 202 needed: D = 2
    expected = advise(workload, LoadProfile(4000.0, (DecodePoint(4.0, 0.02, 20),)), SLO(1.0, 0.05))
    assert (advice["prefill_workers"], advice["decode_workers"]) == (1, 2)
    assert (advice["mixed_workers"], advice["reason"]) == (expected.mixed_workers, expected.reason)
    text = format_advice(advice)
    assert "an estimate from this one run" in text and "1 prefill + 2 decode" in text
    # two workers behind the target: each decoded 2 sequences
    assert run_advice(records, 10.0, SLO(1.0, 0.05), workers=2)["profile"]["decode"][0][
        "batch"
    ] == pytest.approx(2)


def test_equal_prompts_fall_back_to_tokens_over_ttft() -> None:
    records = [request(i, 1000, 0, 0.25) for i in range(4)]
    assert prefill_rate(records) == (4000.0, "uncached prompt tokens over TTFT")
    assert prefill_rate([request(0, 100, 100, 0.01)]) == (None, "every prompt was cached")


def test_defaults_and_the_runs_own_slos() -> None:
    assert advice_slo(None, None) == SLO(0.5, 0.05)
    assert advice_slo(800, 30) == SLO(0.8, 0.03)
    assert run_advice([], 10.0) is None


def test_bench_prints_and_writes_the_advice(tmp_path, capsys) -> None:
    with stub_server_in_thread(Script(first_delay_s=0.005, interval_s=0.002, content_chunks=3)) as (url, _):
        code = loadgen_main.main(
            [
                "--base-url",
                url,
                *SMALL_SHARED_PREFIX,
                "--output-dir",
                str(tmp_path),
                "--no-plots",
                "--slo",
                "ttft:800",
            ]
        )
    assert code == 0
    assert "P:D advice (an estimate from this one run)" in capsys.readouterr().out
    run = next(p for p in tmp_path.glob("*.json") if p.name != "summary.json")
    advice = orjson.loads(run.read_bytes())["pd_advice"]
    assert advice["slo"] == {"ttft_ms": 800, "itl_ms": 50} and advice["workers"] == 1


def test_pd_workers_must_be_positive(tmp_path, caplog) -> None:
    code = loadgen_main.main(
        ["--base-url", "http://127.0.0.1:9", "--pd-workers", "0", "--output-dir", str(tmp_path)]
    )
    assert code == 2 and "--pd-workers" in caplog.text
