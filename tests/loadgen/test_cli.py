"""``python -m loadgen`` end to end against the SSE stub: policy comparison, files, plots."""

from __future__ import annotations

import argparse

import orjson

from loadgen import __main__ as loadgen_main
from loadgen import cli
from tests.loadgen.sse_stub import Script, stub_server_in_thread

SMALL_SHARED_PREFIX = [
    "--workload",
    "shared-prefix",
    "--gsp-num-groups",
    "2",
    "--gsp-prompts-per-group",
    "3",
    "--gsp-system-prompt-len",
    "64",
    "--gsp-question-len",
    "8",
    "--gsp-output-len",
    "3",
]


def test_compare_policies_writes_reports(tmp_path, tokenizer):
    with stub_server_in_thread(Script(first_delay_s=0.005, interval_s=0.002, content_chunks=3)) as (
        url,
        calls,
    ):
        code = loadgen_main.main(
            [
                "--base-url",
                url,
                "--endpoint",
                "completions",
                *SMALL_SHARED_PREFIX,
                "--compare-policies",
                "round_robin,cache_aware",
                "--admin-key",
                "sekret",
                "--concurrency",
                "2",
                "--slo",
                "ttft:1000",
                "tpot:1000",
                "--output-dir",
                str(tmp_path),
                "--pause-between-runs",
                "0",
            ]
        )
    assert code == 0
    assert calls.policies == [("round_robin", "Bearer sekret"), ("cache_aware", "Bearer sekret")]
    assert calls.flushes == 2  # comparing: each run starts cold
    assert {body["model"] for _, body, _ in calls.requests} == {"stub-model"}  # from GET /v1/models
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert [run["label"] for run in summary["runs"]] == ["round_robin", "cache_aware"]
    first = summary["runs"][0]
    for key in (
        "mean_ttft_ms",
        "median_ttft_ms",
        "p99_ttft_ms",
        "mean_tpot_ms",
        "p99_tpot_ms",
        "mean_itl_ms",
        "request_throughput",
        "output_throughput",
        "input_throughput",
        "completed",
        "total_input_tokens",
        "total_output_tokens",
        "cache_hit_rate",
        "goodput",
        "reusable_fraction",
    ):
        assert first[key] is not None, key
    assert first["completed"] == 6 and first["goodput"] > 0
    # raw prompts of 64 + 1 + 8 tokens; 2 of 3 per group reuse 64 tokens (4 blocks of 16)
    assert first["reusable_fraction"] == (2 * 2 * 64) / (6 * 73)
    ratio_row = next(row for row in summary["comparison"] if row["metric"] == "request_throughput")
    assert ratio_row["ratios"]["round_robin"] == 1.0
    lines = (tmp_path / "cache_aware.requests.jsonl").read_bytes().splitlines()
    assert len(lines) == 7 and orjson.loads(lines[0])["warmup"] is True
    for name in ("round_robin.json", "cache_aware.json", "ttft_cdf.png", "hit_rate.png", "throughput.png"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_compare_endpoints_parsing():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--compare", "gw=http://a:1/,http://b:2"])
    targets = cli.parse_targets(args)
    assert [(t.label, t.base_url, t.policy) for t in targets] == [
        ("gw", "http://a:1", None),
        ("http://b:2", "http://b:2", None),
    ]
    args = parser.parse_args(["--base-url", "http://g:3", "--compare-policies", "round_robin, cache_aware"])
    assert [(t.label, t.base_url, t.policy) for t in cli.parse_targets(args)] == [
        ("round_robin", "http://g:3", "round_robin"),
        ("cache_aware", "http://g:3", "cache_aware"),
    ]


def test_an_unreachable_target_is_one_error_line_and_no_report(tmp_path, capsys, caplog):
    from gateway.launcher import free_port  # a port nothing listens on

    url = f"http://127.0.0.1:{free_port()}"
    code = loadgen_main.main(["--base-url", url, "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert f"cannot reach {url}" in caplog.text
    assert not (tmp_path / "out").exists()


def test_a_run_where_nothing_succeeds_writes_no_report(tmp_path, caplog):
    with stub_server_in_thread(Script(status=503)) as (url, calls):
        code = loadgen_main.main(
            ["--base-url", url, *SMALL_SHARED_PREFIX, "--output-dir", str(tmp_path), "--no-plots"]
        )
    assert code == 1 and len(calls.requests) == 7  # the warm-up, then all six measured
    assert "no request succeeded" in caplog.text and "HTTP 503" in caplog.text
    assert not (tmp_path / "summary.json").exists()


def test_progress_is_reported_as_requests_finish(tmp_path, capsys):
    with stub_server_in_thread(Script(first_delay_s=0.0, interval_s=0.0, content_chunks=2)) as (url, _):
        code = loadgen_main.main(
            ["--base-url", url, *SMALL_SHARED_PREFIX, "--output-dir", str(tmp_path), "--no-plots"]
        )
    assert code == 0
    err = capsys.readouterr().err
    assert "6/6 requests" in err and "prompt-cache hit 52%" in err  # 64 of 123 prompt tokens, per the stub


def test_presets_size_the_workload_and_flags_override_them():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    quick = parser.parse_args([])
    assert quick.base_url == "http://127.0.0.1:8080"  # where prefixgate serve listens
    assert cli.sizes(quick, "shared")["num_groups"] == 8
    full = parser.parse_args(["--preset", "sglang", "--gsp-output-len", "7"])
    assert cli.sizes(full, "shared") == {**cli.sizes(full, "shared"), "num_groups": 64, "output_len": 7}
    assert cli.sizes(full, "shared")["system_prompt_len"] == 2048
