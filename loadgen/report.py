"""Console tables and files: one JSON summary per run, per-request JSONL, and a comparison table."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from loadgen.client import RequestRecord

# (label, key, format) rows of the console table, in bench_serving's order
TABLE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("Successful requests", "completed", "{:d}"),
    ("Failed requests", "failed", "{:d}"),
    ("Benchmark duration (s)", "duration", "{:.2f}"),
    ("Total input tokens", "total_input_tokens", "{:d}"),
    ("Total generated tokens", "total_output_tokens", "{:d}"),
    ("Request throughput (req/s)", "request_throughput", "{:.2f}"),
    ("Request goodput (req/s)", "goodput", "{:.2f}"),
    ("Input token throughput (tok/s)", "input_throughput", "{:.2f}"),
    ("Output token throughput (tok/s)", "output_throughput", "{:.2f}"),
    ("Concurrency", "concurrency", "{:.2f}"),
    ("Cache hit rate", "cache_hit_rate", "{:.3f}"),
    ("Recomputed prompt tokens", "total_recomputed_tokens", "{:d}"),
    ("Fetched prompt tokens (KV from a peer)", "total_kv_fetched_tokens", "{:d}"),
    ("Reusable fraction (ideal cache)", "reusable_fraction", "{:.3f}"),
    ("Mean TTFT (ms)", "mean_ttft_ms", "{:.2f}"),
    ("Median TTFT (ms)", "median_ttft_ms", "{:.2f}"),
    ("P90 TTFT (ms)", "p90_ttft_ms", "{:.2f}"),
    ("P99 TTFT (ms)", "p99_ttft_ms", "{:.2f}"),
    ("Mean TPOT (ms)", "mean_tpot_ms", "{:.2f}"),
    ("Median TPOT (ms)", "median_tpot_ms", "{:.2f}"),
    ("P99 TPOT (ms)", "p99_tpot_ms", "{:.2f}"),
    ("Mean ITL (ms)", "mean_itl_ms", "{:.2f}"),
    ("Median ITL (ms)", "median_itl_ms", "{:.2f}"),
    ("P99 ITL (ms)", "p99_itl_ms", "{:.2f}"),
    ("Mean E2E latency (ms)", "mean_e2el_ms", "{:.2f}"),
    ("P99 E2E latency (ms)", "p99_e2el_ms", "{:.2f}"),
    ("Client lateness mean (ms)", "mean_lateness_ms", "{:.2f}"),
    ("Client lateness p99 (ms)", "p99_lateness_ms", "{:.2f}"),
)

# metrics shown in the comparison table, as ratios against the first run
COMPARE_KEYS: tuple[str, ...] = (
    "cache_hit_rate",
    "reusable_fraction",
    "total_recomputed_tokens",
    "total_kv_fetched_tokens",
    "request_throughput",
    "output_throughput",
    "goodput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "p99_tpot_ms",
    "mean_itl_ms",
    "mean_e2el_ms",
)


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    return fmt.format(int(value)) if fmt == "{:d}" else fmt.format(value)


def format_run_table(label: str, metrics: dict[str, Any]) -> str:
    lines = [f"{' ' + label + ' ':=^60}"]
    lines += [f"{name + ':':<42} {_fmt(metrics.get(key), fmt)}" for name, key, fmt in TABLE_ROWS]
    if metrics.get("first_errors"):
        lines.append(f"First error: {metrics['first_errors'][0][:200]}")
    lines.append("=" * 60)
    return "\n".join(lines)


def ratio(value: Any, base: Any) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def compare_rows(
    runs: Sequence[tuple[str, dict[str, Any]]], keys: Sequence[str] = COMPARE_KEYS
) -> list[dict]:
    """One row per metric: each run's value and its ratio to the first run's."""
    base = runs[0][1]
    return [
        {
            "metric": key,
            "values": {label: m.get(key) for label, m in runs},
            "ratios": {label: ratio(m.get(key), base.get(key)) for label, m in runs},
        }
        for key in keys
    ]


def format_compare_table(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    labels = [label for label, _ in runs]
    width = max(14, *(len(label) + 10 for label in labels))
    header = f"{'metric':<24}" + "".join(f"{label:>{width}}" for label in labels)
    lines = [f"Comparison (value, ratio to {labels[0]})", header, "-" * len(header)]
    for row in compare_rows(runs):
        cells = []
        for label in labels:
            value, r = row["values"][label], row["ratios"][label]
            cell = "n/a" if value is None else f"{value:.3g}" + ("" if r is None else f" ({r:.2f}x)")
            cells.append(f"{cell:>{width}}")
        lines.append(f"{row['metric']:<24}" + "".join(cells))
    return "\n".join(lines)


def safe_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def write_json(path: Path, data: Any) -> None:
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


def write_requests_jsonl(path: Path, records: Sequence[RequestRecord]) -> None:
    with path.open("wb") as f:
        for record in records:
            f.write(orjson.dumps(record.to_json()) + b"\n")
