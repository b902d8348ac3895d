"""PNG plots with matplotlib's Agg backend (no display needed): TTFT CDFs, hit-rate and throughput bars."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadgen.client import RequestRecord


def _pyplot():
    import matplotlib  # imported here: plots are optional and matplotlib is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ttft_cdf(runs: Sequence[tuple[str, Sequence[RequestRecord]]], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, records in runs:
        ttfts = np.sort(
            [r.ttft_s * 1000.0 for r in records if r.success and not r.warmup and r.ttft_s is not None]
        )
        if len(ttfts):
            ax.step(ttfts, np.arange(1, len(ttfts) + 1) / len(ttfts), where="post", label=label)
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_hit_rate(runs: Sequence[tuple[str, dict[str, Any]]], path: Path) -> None:
    """Measured cache-hit rate per run next to the workload's reusable fraction (the ideal)."""
    plt = _pyplot()
    labels = [label for label, _ in runs]
    x = np.arange(len(labels))
    measured = [m.get("cache_hit_rate") or 0.0 for _, m in runs]
    ideal = [m.get("reusable_fraction") or 0.0 for _, m in runs]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(labels) + 2), 4.5))
    ax.bar(x - 0.2, measured, 0.4, label="measured cache-hit rate")
    ax.bar(x + 0.2, ideal, 0.4, label="reusable fraction (ideal cache)", alpha=0.6)
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of prompt tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_throughput(runs: Sequence[tuple[str, dict[str, Any]]], path: Path) -> None:
    plt = _pyplot()
    labels = [label for label, _ in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(7, 2.4 * len(labels) + 3), 4.5))
    left.bar(labels, [m.get("request_throughput") or 0.0 for _, m in runs])
    left.set_ylabel("requests / s")
    right.bar(labels, [m.get("output_throughput") or 0.0 for _, m in runs], color="tab:orange")
    right.set_ylabel("output tokens / s")
    fig.suptitle("Throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(
    output_dir: Path, runs: Sequence[tuple[str, dict[str, Any], Sequence[RequestRecord]]]
) -> list[Path]:
    paths = [output_dir / "ttft_cdf.png", output_dir / "hit_rate.png", output_dir / "throughput.png"]
    plot_ttft_cdf([(label, records) for label, _, records in runs], paths[0])
    plot_hit_rate([(label, metrics) for label, metrics, _ in runs], paths[1])
    plot_throughput([(label, metrics) for label, metrics, _ in runs], paths[2])
    return paths
