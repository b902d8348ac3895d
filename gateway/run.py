"""``prefixgate gateway --worker URL ...``: the gateway in front of workers that already run."""

from __future__ import annotations

import argparse
import functools
import logging
import os

from aiohttp import web

from cache.api.flags import add_config_arguments
from cache.api.flags import config_from_args as config_fields_from_args
from gateway.app import create_app, server_options
from gateway.config import GatewayConfig, RoutingConfig
from gateway.policies import POLICIES
from gateway.processes import check_procs, serve_processes
from gateway.tenancy import METRICS_KEY_ENV, SALT_SECRET_ENV, load_api_keys, salt_secret

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, workers_required: bool = True) -> None:
    """``workers_required``: the workers are given on the command line (``--worker``), not started here."""
    add_config_arguments(parser, GatewayConfig, exclude=() if workers_required else ("workers",))
    routing = parser.add_argument_group("routing")
    add_config_arguments(routing, RoutingConfig, overrides={"policy": {"choices": sorted(POLICIES)}})
    parser.add_argument(
        "--api-keys",
        default=None,
        metavar="FILE",
        help='JSON {"<key>": {"tenant": "name", "salt": "..."}}; requests then need a key (salts are '
        f"keyed with ${SALT_SECRET_ENV}; /stats and /metrics then need the admin key or ${METRICS_KEY_ENV})",
    )
    parser.add_argument(
        "--procs",
        type=int,
        default=1,
        help="gateway processes on the one port (SO_REUSEPORT); more than 1 needs --redis",
    )
    parser.add_argument(
        "--admin-key-env",
        default="PREFIXGATE_ADMIN_KEY",
        help="environment variable holding the admin key (admin routes are off without it)",
    )


def config_from_args(args: argparse.Namespace, workers: list[str]) -> GatewayConfig:
    return config_fields_from_args(
        GatewayConfig,
        args,
        workers=tuple(workers),
        routing=config_fields_from_args(RoutingConfig, args),
        api_keys=load_api_keys(args.api_keys, salt_secret(os.environ.get(SALT_SECRET_ENV)))
        if args.api_keys
        else {},
        admin_key=os.environ.get(args.admin_key_env) or None,  # never on the command line: ps shows it
        metrics_key=os.environ.get(METRICS_KEY_ENV) or None,
    )


def serve_gateway(config: GatewayConfig, procs: int = 1, log_level: str = "info") -> int:
    """Serve until stopped; ``procs`` > 1: that many processes on the port (``gateway.processes``)."""
    if procs > 1:
        return serve_processes(config, procs, functools.partial(serve_one, reuse_port=True), log_level)
    serve_one(config)
    return 0


def serve_one(config: GatewayConfig, reuse_port: bool = False) -> None:
    """One gateway process; ``reuse_port``: it shares the port with its siblings (``--procs``)."""
    log.info(
        "gateway on http://%s:%d (policy %s, %d workers)",
        config.host,
        config.port,
        config.routing.policy,
        len(config.workers),
    )
    # handler_cancellation: a client that disconnects cancels its handler, which closes the upstream
    # connection, which makes the worker abort the request and free its KV pages.
    web.run_app(
        create_app(config),
        host=config.host,
        port=config.port,
        print=None,
        access_log=None,
        handler_cancellation=True,
        reuse_port=reuse_port,
        **server_options(config),
    )


def run(args: argparse.Namespace) -> int:
    if not args.workers and not args.worker_dns:
        log.error(
            "no --worker or --worker-dns given; attach at least one (or use `prefixgate serve` to start engines)"
        )
        return 2
    config = config_from_args(args, args.workers or [])
    problem = check_procs(args.procs, config)
    if problem:
        log.error("%s", problem)
        return 2
    return serve_gateway(config, args.procs, args.log_level)
