"""``python -m loadgen`` / ``prefixgate bench``: build a workload, run it, report.

Mountable as a ``prefixgate`` subcommand: ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import math
import os
import time
from pathlib import Path

from loadgen.admin import AdminCallError, TargetUnreachable, check_reachable, first_model_id
from loadgen.bench import BenchConfig, NothingSucceeded, Target, run_targets
from loadgen.metrics import SLO
from loadgen.prompts import PromptRenderer, RequestOptions
from loadgen.runner import LoadConfig, make_session
from loadgen.workloads import (
    WORKLOAD_NAMES,
    LongDocQAConfig,
    MultiTurnConfig,
    RandomConfig,
    SharedPrefixConfig,
    WordVocabulary,
    Workload,
    build_long_doc_qa,
    build_multi_turn,
    build_random,
    build_shared_prefix,
)

# Workload sizes per preset: "quick" finishes in about a minute against one CPU worker of the default
# model; "sglang" is SGLang's bench_serving defaults (the dataclasses' own), for GPU fleets.
PRESETS = {
    "quick": {
        "shared": SharedPrefixConfig(8, 4, 512, 32, 32),
        "multi": MultiTurnConfig(8, 3, 256, 32, 32, 0.5),
        "doc": LongDocQAConfig(2, 1024, 8, 32, 32),
        "random": RandomConfig(32, 256, 32),
    },
    "sglang": {
        "shared": SharedPrefixConfig(),
        "multi": MultiTurnConfig(),
        "doc": LongDocQAConfig(),
        "random": RandomConfig(),
    },
}
# flag -> (preset entry, config field, help)
SIZE_FLAGS = {
    "--gsp-num-groups": ("shared", "num_groups", "shared-prefix groups"),
    "--gsp-prompts-per-group": ("shared", "prompts_per_group", ""),
    "--gsp-system-prompt-len": ("shared", "system_prompt_len", ""),
    "--gsp-question-len": ("shared", "question_len", ""),
    "--gsp-output-len": ("shared", "output_len", ""),
    "--zipf-alpha": ("shared", "zipf_alpha", "0: every group equally often"),
    "--mt-num-conversations": ("multi", "num_conversations", "multi-turn conversations"),
    "--mt-turns": ("multi", "turns_per_conversation", ""),
    "--mt-system-prompt-len": ("multi", "system_prompt_len", ""),
    "--mt-user-turn-len": ("multi", "user_turn_len", ""),
    "--mt-output-len": ("multi", "output_len", ""),
    "--think-time": ("multi", "think_time_s", "mean seconds (exponential)"),
    "--doc-num-documents": ("doc", "num_documents", "long-doc-qa documents"),
    "--doc-len": ("doc", "document_len", ""),
    "--doc-questions-per-document": ("doc", "questions_per_document", ""),
    "--doc-question-len": ("doc", "question_len", ""),
    "--doc-output-len": ("doc", "output_len", ""),
    "--random-num-prompts": ("random", "num_prompts", "random (no reuse) prompts"),
    "--random-input-len": ("random", "input_len", ""),
    "--random-output-len": ("random", "output_len", ""),
}
DESCRIPTION = "load generator: prefix-heavy workloads, SGLang/vLLM-compatible serving metrics, comparisons"
log = logging.getLogger("loadgen")
WARMUP_INPUT_LEN, WARMUP_OUTPUT_LEN = 32, 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument(
        "--base-url",
        default="http://127.0.0.1:8080",
        help="server root, no /v1 (default: prefixgate serve's)",
    )
    target.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    target.add_argument("--model", default=None, help="model id (default: the first from GET /v1/models)")
    target.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY"
    )
    target.add_argument(
        "--prompt-format",
        choices=("text", "ids"),
        default="text",
        help="completions only: send the prompt as text or as a list of token ids",
    )
    target.add_argument(
        "--tokenizer", default=None, help="model file/dir for the tokenizer (default: bundled SmolLM2)"
    )
    target.add_argument("--disable-ignore-eos", action="store_true", help="do not send ignore_eos=true")

    work = parser.add_argument_group(
        "workload", "sizes default to --preset (quick: about a minute on a CPU worker; sglang: SGLang's own)"
    )
    work.add_argument("--workload", choices=WORKLOAD_NAMES, default="shared-prefix")
    work.add_argument(
        "--preset", choices=sorted(PRESETS), default="quick", help="workload sizes (default: quick)"
    )
    work.add_argument("--seed", type=int, default=1)
    for flag, (config_name, field_name, help_text) in SIZE_FLAGS.items():
        quick, full = (
            getattr(PRESETS["quick"][config_name], field_name),
            getattr(PRESETS["sglang"][config_name], field_name),
        )
        extra = f"{help_text}; " if help_text else ""
        work.add_argument(
            flag,
            type=type(full),
            default=None,
            dest=flag.removeprefix("--").replace("-", "_"),
            help=f"{extra}default {quick} (quick) / {full} (sglang)",
        )

    load = parser.add_argument_group("load")
    load.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="Poisson rate (req/s; multi-turn: conversations/s)",
    )
    load.add_argument(
        "--concurrency", type=int, default=None, help="closed loop: requests (conversations) in flight"
    )
    load.add_argument("--num-prompts", type=int, default=None, help="cap on measured requests")
    load.add_argument(
        "--duration", type=float, default=None, help="stop starting requests after this many seconds"
    )
    load.add_argument(
        "--warmup-requests", type=int, default=1, help="short unrelated prompts sent before timing"
    )

    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", default=None, help="default: loadgen-results/<workload>-<time>")
    out.add_argument("--slo", nargs="+", default=[], metavar="NAME:MS", help="e.g. --slo ttft:500 tpot:50")
    out.add_argument("--percentiles", default="90,95,99")
    out.add_argument(
        "--cache-block-size", type=int, default=16, help="block size of the ideal cache for reuse"
    )
    out.add_argument("--no-plots", action="store_true")
    out.add_argument(
        "--pause-between-runs", type=float, default=2.0, help="seconds of quiet between compared runs"
    )
    out.add_argument("--label", default=None, help="name of a single run (default: the base URL)")
    out.add_argument(
        "--pd-workers",
        type=int,
        default=1,
        metavar="N",
        help="workers behind the target: the P:D advice printed after each run takes the run's decode "
        "concurrency divided by N as one worker's batch (targets from --slo ttft:MS tpot:MS)",
    )

    comp = parser.add_argument_group("comparison")
    comp.add_argument(
        "--compare", default=None, metavar="[LABEL=]URL,...", help="run against several endpoints"
    )
    comp.add_argument(
        "--compare-policies", default=None, metavar="POLICY,...", help="gateway routing policies"
    )
    comp.add_argument(
        "--admin-key", default=os.environ.get("PREFIXGATE_ADMIN_KEY"), help="default: $PREFIXGATE_ADMIN_KEY"
    )
    comp.add_argument(
        "--flush-cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="POST /flush_cache before each run (default: on when comparing)",
    )


def parse_targets(args: argparse.Namespace) -> list[Target]:
    base = args.base_url.rstrip("/")
    if args.compare and args.compare_policies:
        raise ValueError("--compare and --compare-policies are exclusive")
    if args.compare:
        targets = []
        for item in args.compare.split(","):
            label, sep, url = item.strip().partition("=")
            url = url if sep else label
            targets.append(Target(label if sep else url, url.rstrip("/")))
        return targets
    if args.compare_policies:
        return [
            Target(p.strip(), base, policy=p.strip()) for p in args.compare_policies.split(",") if p.strip()
        ]
    return [Target(args.label or base, base)]


def sizes(args: argparse.Namespace, entry: str) -> dict[str, object]:
    """The workload's size fields: each flag given, else the preset's value."""
    preset = PRESETS[getattr(args, "preset", "quick")][entry]
    out = {}
    for flag, (config_name, field_name, _) in SIZE_FLAGS.items():
        if config_name == entry:
            value = getattr(args, flag.removeprefix("--").replace("-", "_"), None)
            out[field_name] = value if value is not None else getattr(preset, field_name)
    return out


def build_workload(args: argparse.Namespace, vocab: WordVocabulary) -> Workload:
    if args.workload == "shared-prefix":
        return build_shared_prefix(SharedPrefixConfig(**sizes(args, "shared"), seed=args.seed), vocab)
    if args.workload == "multi-turn":
        return build_multi_turn(MultiTurnConfig(**sizes(args, "multi"), seed=args.seed), vocab)
    if args.workload == "long-doc-qa":
        return build_long_doc_qa(LongDocQAConfig(**sizes(args, "doc"), seed=args.seed), vocab)
    return build_random(RandomConfig(**sizes(args, "random"), seed=args.seed), vocab)


@functools.lru_cache(maxsize=4)  # a pure memo: parsing a GGUF vocabulary takes seconds
def load_tokenizer(path: str | None):
    """The tokenizer of ``path`` (a GGUF file or HF directory); None: the bundled SmolLM2."""
    from cache.prompt.model_files import default_model_path
    from cache.prompt.tokenizer import Tokenizer

    return Tokenizer.from_checkpoint_path(path or default_model_path())


async def _main(args: argparse.Namespace) -> int:
    if args.pd_workers < 1:
        raise ValueError("--pd-workers must be at least 1")
    targets = parse_targets(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with make_session() as session:
        for target in targets:
            await check_reachable(session, target.base_url, headers)
    tokenizer = load_tokenizer(args.tokenizer)
    vocab = WordVocabulary.from_tokenizer(tokenizer)
    workload = build_workload(args, vocab)
    warmup = build_random(
        RandomConfig(args.warmup_requests, WARMUP_INPUT_LEN, WARMUP_OUTPUT_LEN, seed=args.seed + 7919), vocab
    ).conversations
    warmup = tuple(c.__class__(f"warmup{i}", c.turns) for i, c in enumerate(warmup))
    load = LoadConfig(
        request_rate=args.request_rate,
        concurrency=args.concurrency,
        num_prompts=args.num_prompts,
        duration_s=args.duration,
        warmup_requests=args.warmup_requests,
        seed=args.seed,
    )
    output_dir = Path(args.output_dir or f"loadgen-results/{workload.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    config = BenchConfig(
        output_dir=output_dir,
        slo=SLO.parse(args.slo),
        percentiles=tuple(float(p) for p in args.percentiles.split(",") if p.strip()),
        cache_block_size=args.cache_block_size,
        flush_cache=args.flush_cache if args.flush_cache is not None else len(targets) > 1,
        admin_key=args.admin_key,
        plots=not args.no_plots,
        pause_between_runs_s=args.pause_between_runs,
        pd_workers=args.pd_workers,
    )
    async with make_session() as session:
        model = args.model
        if model is None:
            model = await first_model_id(session, targets[0].base_url, headers) or "default"
        options = RequestOptions(
            endpoint=args.endpoint,
            model=model,
            prompt_format=args.prompt_format,
            ignore_eos=not args.disable_ignore_eos,
            api_key=args.api_key,
        )
        renderer = PromptRenderer(tokenizer, vocab.separator_ids, options)
        log.info(
            "workload %s: %d conversations, %d requests",
            workload.name,
            len(workload.conversations),
            workload.num_requests,
        )
        reports = await run_targets(targets, workload, renderer, load, config, warmup, session)
    print(f"results in {output_dir}")
    return 0 if all(r.metrics["completed"] > 0 for r in reports) else 1


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_main(args))
    except (ValueError, AdminCallError, TargetUnreachable) as exc:
        log.error("%s", exc)
        return 2
    except NothingSucceeded as exc:
        log.error("%s (no report written)", exc)
        return 1
