"""``prefixgate serve``: the main job — N workers as child processes, then the gateway in front of them;
the workers stop with it.

``--engine prefixgate`` (default) starts the embedded engine; ``--engine sglang|vllm`` starts SGLang or
vLLM servers (``gateway.engines`` builds their command lines) under a ``Supervisor`` that restarts any
that crashes, one per GPU or per ``--gpus`` group, and attaches the gateway to their KV events.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from cache.api.flags import FlagError
from gateway import run as gateway_run
from gateway.config import GatewayConfig
from gateway.engines import ENGINES, parse_gpu_groups, plan
from gateway.launcher import engine_workers, free_ports
from gateway.supervisor import Supervisor

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gateway_run.add_arguments(parser, workers_required=False)
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="prefixgate",
        help="which engine to start: the embedded one, SGLang (python -m sglang.launch_server) or vLLM "
        "(vllm serve); for the latter two --model is the model directory, which the gateway tokenizes with",
    )
    parser.add_argument("--workers", type=int, default=1, help="engine workers to start (one GPU each)")
    parser.add_argument(
        "--gpus",
        action="append",
        default=[],
        metavar="IDS",
        help="SGLang/vLLM: one worker on these GPUs with tensor parallelism, e.g. --gpus 0,1 --gpus 2,3 "
        "(replaces --workers)",
    )
    parser.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for each engine, e.g. --engine-arg=--max-batch-tokens=256, or SGLang's "
        "HiCache: --engine-arg=--enable-hierarchical-cache --engine-arg=--hicache-ratio=2",
    )
    parser.add_argument(
        "--prefill-workers",
        dest="prefill_count",  # not GatewayConfig.prefill_workers (URLs)
        type=int,
        default=0,
        metavar="N",
        help="prefill/decode disaggregation with the embedded engine: start N prefill workers "
        "(--role prefill) and --decode-workers decode workers instead of --workers mixed ones",
    )
    parser.add_argument(
        "--decode-workers",
        dest="decode_count",
        type=int,
        default=0,
        metavar="M",
        help="decode workers (--role decode)",
    )
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument(
        "--engine-log-dir", type=Path, default=None, help="SGLang/vLLM: write worker<i>.log files here"
    )


def run(args: argparse.Namespace) -> int:
    config = check_flags(args)
    if args.prefill_count or args.decode_count:
        return _serve_disaggregated(args, config)
    if args.engine == "prefixgate":
        with engine_workers(args.workers, args.model, args.engine_arg, args.startup_timeout) as launched:
            config = dataclasses.replace(config, workers=tuple(w.url for w in launched))
            return gateway_run.serve_gateway(config, args.procs, args.log_level)
    try:
        groups = parse_gpu_groups(args.gpus, args.workers)
    except ValueError as exc:
        raise FlagError(str(exc)) from None
    launches = plan(args.engine, args.model, groups, free_ports(2 * len(groups)), args.engine_arg)
    supervisor = Supervisor(launches, args.startup_timeout, args.engine_log_dir)
    with supervisor.running():
        config = dataclasses.replace(config, workers=tuple(supervisor.urls))
        events = (*config.worker_events, *(launch.events for launch in launches))
        return gateway_run.serve_gateway(
            dataclasses.replace(config, worker_events=events), args.procs, args.log_level
        )


def check_flags(args: argparse.Namespace) -> GatewayConfig:
    """The gateway's config (no workers yet), every flag checked before a worker starts: a mistake costs
    one line and exit status 2 (``FlagError``), not a model load first."""
    config = gateway_run.config_from_args(args, [])
    if args.engine != "prefixgate" and not args.model:
        raise FlagError(
            f"--engine {args.engine} needs --model (the model directory both the engine and gateway load)"
        )
    disaggregated = args.prefill_count or args.decode_count
    if disaggregated and args.engine != "prefixgate":
        raise FlagError(
            "--prefill-workers/--decode-workers start the embedded engine; for SGLang or vLLM pairs start "
            "them yourself and attach them with `prefixgate gateway --prefill URL --decode URL`"
        )
    if disaggregated and (args.prefill_count < 1 or args.decode_count < 1):
        raise FlagError("--prefill-workers and --decode-workers: disaggregation needs at least 1 of each")
    if args.workers < 1 and not disaggregated and not (args.gpus and args.engine != "prefixgate"):
        raise FlagError(
            f"--workers {args.workers}: start at least 1 (or attach workers that already run with "
            "`prefixgate gateway --worker URL`)"
        )
    gateway_run.check_startup(config, args.procs, engine_weights=args.engine == "prefixgate")
    return config


def _serve_disaggregated(args: argparse.Namespace, config: GatewayConfig) -> int:
    """N prefill and M decode embedded-engine workers, each pool started with its role, the gateway in
    front routing long prompts through a prefill worker (``gateway.disaggregation``)."""
    extra = list(args.engine_arg)
    with (
        engine_workers(
            args.prefill_count, args.model, [*extra, "--role", "prefill"], args.startup_timeout
        ) as prefill,
        engine_workers(
            args.decode_count, args.model, [*extra, "--role", "decode"], args.startup_timeout
        ) as decode,
    ):
        config = dataclasses.replace(
            config,
            prefill_workers=tuple(w.url for w in prefill),
            decode_workers=tuple(w.url for w in decode),
        )
        return gateway_run.serve_gateway(config, args.procs, args.log_level)
