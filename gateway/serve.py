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

from gateway import run as gateway_run
from gateway.engines import ENGINES, parse_gpu_groups, plan
from gateway.launcher import engine_workers, free_ports
from gateway.processes import check_procs
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
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument(
        "--engine-log-dir", type=Path, default=None, help="SGLang/vLLM: write worker<i>.log files here"
    )


def run(args: argparse.Namespace) -> int:
    problem = check_procs(args.procs, gateway_run.config_from_args(args, []))
    if problem:
        log.error("%s", problem)
        return 2
    if args.engine == "prefixgate":
        with engine_workers(args.workers, args.model, args.engine_arg, args.startup_timeout) as launched:
            config = gateway_run.config_from_args(args, [w.url for w in launched])
            return gateway_run.serve_gateway(config, args.procs, args.log_level)
    if not args.model:
        log.error(
            "--engine %s needs --model (the model directory both the engine and gateway load)", args.engine
        )
        return 2
    try:
        groups = parse_gpu_groups(args.gpus, args.workers)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    launches = plan(args.engine, args.model, groups, free_ports(2 * len(groups)), args.engine_arg)
    supervisor = Supervisor(launches, args.startup_timeout, args.engine_log_dir)
    with supervisor.running():
        config = gateway_run.config_from_args(args, supervisor.urls)
        events = (*config.worker_events, *(launch.events for launch in launches))
        return gateway_run.serve_gateway(
            dataclasses.replace(config, worker_events=events), args.procs, args.log_level
        )
