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

from loadgen.admin import AdminCallError
from loadgen.bench import BenchConfig, Target, run_targets
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

DESCRIPTION = "load generator: prefix-heavy workloads, SGLang/vLLM-compatible serving metrics, comparisons"
log = logging.getLogger("loadgen")
WARMUP_INPUT_LEN, WARMUP_OUTPUT_LEN = 32, 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (no /v1)")
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

    work = parser.add_argument_group("workload")
    work.add_argument("--workload", choices=WORKLOAD_NAMES, default="shared-prefix")
    work.add_argument("--seed", type=int, default=1)
    d = SharedPrefixConfig()
    work.add_argument("--gsp-num-groups", type=int, default=d.num_groups)
    work.add_argument("--gsp-prompts-per-group", type=int, default=d.prompts_per_group)
    work.add_argument("--gsp-system-prompt-len", type=int, default=d.system_prompt_len)
    work.add_argument("--gsp-question-len", type=int, default=d.question_len)
    work.add_argument("--gsp-output-len", type=int, default=d.output_len)
    work.add_argument("--zipf-alpha", type=float, default=d.zipf_alpha, help="0: every group equally often")
    m = MultiTurnConfig()
    work.add_argument("--mt-num-conversations", type=int, default=m.num_conversations)
    work.add_argument("--mt-turns", type=int, default=m.turns_per_conversation)
    work.add_argument("--mt-system-prompt-len", type=int, default=m.system_prompt_len)
    work.add_argument("--mt-user-turn-len", type=int, default=m.user_turn_len)
    work.add_argument("--mt-output-len", type=int, default=m.output_len)
    work.add_argument("--think-time", type=float, default=m.think_time_s, help="mean seconds (exponential)")
    q = LongDocQAConfig()
    work.add_argument("--doc-num-documents", type=int, default=q.num_documents)
    work.add_argument("--doc-len", type=int, default=q.document_len)
    work.add_argument("--doc-questions-per-document", type=int, default=q.questions_per_document)
    work.add_argument("--doc-question-len", type=int, default=q.question_len)
    work.add_argument("--doc-output-len", type=int, default=q.output_len)
    r = RandomConfig()
    work.add_argument("--random-num-prompts", type=int, default=r.num_prompts)
    work.add_argument("--random-input-len", type=int, default=r.input_len)
    work.add_argument("--random-output-len", type=int, default=r.output_len)

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


def build_workload(args: argparse.Namespace, vocab: WordVocabulary) -> Workload:
    if args.workload == "shared-prefix":
        return build_shared_prefix(
            SharedPrefixConfig(
                args.gsp_num_groups,
                args.gsp_prompts_per_group,
                args.gsp_system_prompt_len,
                args.gsp_question_len,
                args.gsp_output_len,
                args.zipf_alpha,
                args.seed,
            ),
            vocab,
        )
    if args.workload == "multi-turn":
        return build_multi_turn(
            MultiTurnConfig(
                args.mt_num_conversations,
                args.mt_turns,
                args.mt_system_prompt_len,
                args.mt_user_turn_len,
                args.mt_output_len,
                args.think_time,
                args.seed,
            ),
            vocab,
        )
    if args.workload == "long-doc-qa":
        return build_long_doc_qa(
            LongDocQAConfig(
                args.doc_num_documents,
                args.doc_len,
                args.doc_questions_per_document,
                args.doc_question_len,
                args.doc_output_len,
                args.seed,
            ),
            vocab,
        )
    return build_random(
        RandomConfig(args.random_num_prompts, args.random_input_len, args.random_output_len, args.seed), vocab
    )


@functools.lru_cache(maxsize=4)  # a pure memo: parsing a GGUF vocabulary takes seconds
def load_tokenizer(path: str | None):
    """The tokenizer of ``path`` (a GGUF file or HF directory); None: the bundled SmolLM2."""
    from cache.prompt.model_files import default_model_path
    from cache.prompt.tokenizer import Tokenizer

    return Tokenizer.from_checkpoint_path(path or default_model_path())


async def _main(args: argparse.Namespace) -> int:
    targets = parse_targets(args)
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
    )
    async with make_session() as session:
        model = args.model
        if model is None:
            from loadgen.admin import first_model_id

            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
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
    except (ValueError, AdminCallError) as exc:
        log.error("%s", exc)
        return 2
