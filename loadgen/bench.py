"""One benchmark = the same workload against one or more targets (endpoints or gateway policies)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from loadgen import admin, pd_estimate, report
from loadgen.client import RequestRecord
from loadgen.metrics import DEFAULT_PERCENTILES, SLO, compute_metrics
from loadgen.progress import Progress
from loadgen.prompts import ENDPOINT_PATHS, PromptRenderer
from loadgen.reuse import reusable_tokens
from loadgen.runner import LoadConfig, RunResult, make_session, run_load, truncate_workload
from loadgen.workloads.base import Conversation, Workload

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """Where one run goes; ``policy`` (a gateway routing policy) is set through the admin route first."""

    label: str
    base_url: str
    policy: str | None = None


@dataclass(frozen=True)
class BenchConfig:
    output_dir: Path
    slo: SLO = field(default_factory=SLO)
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    cache_block_size: int = 16
    flush_cache: bool = False
    admin_key: str | None = None
    pause_between_runs_s: float = 2.0
    plots: bool = True
    pd_workers: int = 1  # workers behind the target, for the P:D advice estimate (``loadgen.pd_estimate``)


class NothingSucceeded(RuntimeError):
    """Every measured request of a run failed: there is nothing to report, only the first error."""


@dataclass
class RunReport:
    label: str
    metrics: dict[str, Any]
    records: list[RequestRecord]


def annotate_reuse(result: RunResult, renderer: PromptRenderer, block_size: int) -> float:
    """Fill each measured record's expected prompt tokens and ideal-cache reuse; return the fraction.

    Order is the actual send order; replies are re-encoded from their text (an approximation of the
    generated ids that an engine caches after decoding).
    """
    measured = [r for r in result.records if not r.warmup]
    prompts = [renderer.server_token_ids(result.rendered[r.request_id]) for r in measured]
    replies = [renderer.tokenizer.encode(r.generated_text) if r.generated_text else None for r in measured]
    for record, prompt, reusable in zip(
        measured, prompts, reusable_tokens(prompts, block_size, replies), strict=True
    ):
        record.expected_prompt_tokens = len(prompt)
        record.reusable_tokens = reusable
    total = sum(len(p) for p in prompts)
    return sum(r.reusable_tokens or 0 for r in measured) / total if total else 0.0


async def run_targets(
    targets: Sequence[Target],
    workload: Workload,
    renderer: PromptRenderer,
    load: LoadConfig,
    config: BenchConfig,
    warmup: Sequence[Conversation] = (),
    session: aiohttp.ClientSession | None = None,
) -> list[RunReport]:
    """Run ``workload`` against each target in turn; write per-run JSON/JSONL, a summary and plots."""
    config.output_dir.mkdir(parents=True, exist_ok=True)
    own_session = session is None
    session = session or make_session()
    reports: list[RunReport] = []
    try:
        for index, target in enumerate(targets):
            if index > 0 and config.pause_between_runs_s > 0:
                await asyncio.sleep(config.pause_between_runs_s)
            if target.policy is not None:
                await admin.set_gateway_policy(session, target.base_url, target.policy, config.admin_key)
            if config.flush_cache:
                await admin.flush_cache(session, target.base_url, config.admin_key)
            url = target.base_url + ENDPOINT_PATHS[renderer.options.endpoint]
            log.info(
                "run %s: %d requests of %s -> %s", target.label, workload.num_requests, workload.name, url
            )
            total = sum(len(c.turns) for c in truncate_workload(workload, load.num_prompts))
            progress = Progress(target.label, min(total, load.num_prompts or total))
            try:
                result = await run_load(session, url, workload, renderer, load, warmup, progress)
            finally:
                progress.close()
            measured = [r for r in result.records if not r.warmup]
            if not any(r.success for r in measured):
                first = measured[0].error if measured else "no request was sent"
                raise NothingSucceeded(
                    f"run {target.label}: no request succeeded against {url}; first error: {first}"
                )
            reports.append(_report_run(target, workload, renderer, load, config, result))
    finally:
        if own_session:
            await session.close()
    _write_summary(reports, config)
    return reports


def _report_run(
    target: Target,
    workload: Workload,
    renderer: PromptRenderer,
    load: LoadConfig,
    config: BenchConfig,
    result: RunResult,
) -> RunReport:
    reusable = annotate_reuse(result, renderer, config.cache_block_size)
    metrics = compute_metrics(result.records, result.duration_s, config.slo, config.percentiles)
    metrics.update(
        label=target.label,
        base_url=target.base_url,
        policy=target.policy,
        endpoint=renderer.options.endpoint,
        model=renderer.options.model,
        reusable_fraction=reusable,
        reuse_block_size=config.cache_block_size,
        workload=workload.params,
        request_rate=load.request_rate if load.open_loop else "inf",
        max_concurrency=load.concurrency,
        load={k: (v if v != float("inf") else "inf") for k, v in asdict(load).items()},
        slo={k: v for k, v in asdict(config.slo).items() if v is not None},
    )
    slo = pd_estimate.advice_slo(config.slo.ttft_ms, config.slo.tpot_ms)
    advice = pd_estimate.run_advice(result.records, result.duration_s, slo, config.pd_workers)
    if advice is not None:
        metrics["pd_advice"] = advice
    print(report.format_run_table(target.label, metrics), flush=True)
    if advice is not None:
        print(pd_estimate.format_advice(advice), flush=True)
    stem = report.safe_label(target.label)
    report.write_json(config.output_dir / f"{stem}.json", metrics)
    report.write_requests_jsonl(config.output_dir / f"{stem}.requests.jsonl", result.records)
    return RunReport(target.label, metrics, result.records)


def _write_summary(reports: Sequence[RunReport], config: BenchConfig) -> None:
    if not reports:
        return
    pairs = [(r.label, r.metrics) for r in reports]
    summary: dict[str, Any] = {"runs": [r.metrics for r in reports]}
    if len(reports) > 1:
        summary["comparison"] = report.compare_rows(pairs)
        print(report.format_compare_table(pairs), flush=True)
    report.write_json(config.output_dir / "summary.json", summary)
    if config.plots:
        from loadgen.plots import write_plots

        paths = write_plots(config.output_dir, [(r.label, r.metrics, r.records) for r in reports])
        log.info("plots: %s", ", ".join(str(p) for p in paths))
