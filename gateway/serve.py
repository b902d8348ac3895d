"""``prefixgate serve``: the main job — N embedded engine workers as child processes, then the
gateway in front of them; the workers stop with it."""

from __future__ import annotations

import argparse

from gateway import run as gateway_run
from gateway.launcher import engine_workers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gateway_run.add_arguments(parser, workers_required=False)
    parser.add_argument("--workers", type=int, default=1, help="embedded engine workers to start")
    parser.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for each engine, e.g. --engine-arg=--max-batch-tokens=256",
    )
    parser.add_argument("--startup-timeout", type=float, default=600.0)


def run(args: argparse.Namespace) -> int:
    with engine_workers(args.workers, args.model, args.engine_arg, args.startup_timeout) as launched:
        gateway_run.serve_gateway(gateway_run.config_from_args(args, [w.url for w in launched]))
    return 0
