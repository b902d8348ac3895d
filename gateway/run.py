"""``prefixgate gateway --worker URL ...``: the gateway in front of workers that already run."""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os

from aiohttp import web

from cache.api.flags import FlagError, add_config_arguments, check_can_listen, port_taken
from cache.api.flags import config_from_args as config_fields_from_args
from cache.prompt.model_files import WeightLoadError, check_model_path
from gateway.app import create_app, server_options
from gateway.config import GatewayConfig, RoutingConfig, Tenant
from gateway.policies import POLICIES
from gateway.processes import check_procs, serve_processes
from gateway.tenancy import METRICS_KEY_ENV, SALT_SECRET_ENV, load_api_keys, salt_secret

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, workers_required: bool = True) -> None:
    """``workers_required``: the workers are given on the command line (``--worker``), not started here."""
    started_here = ("workers", "prefill_workers", "decode_workers")
    add_config_arguments(parser, GatewayConfig, exclude=() if workers_required else started_here)
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
        "--allow-empty-api-keys",
        action="store_true",
        help="start even when the --api-keys file lists no key (authentication is then off); without "
        "this an empty file is refused",
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
    """Raises ``FlagError`` for a keys file that cannot work."""
    return config_fields_from_args(
        GatewayConfig,
        args,
        workers=tuple(workers),
        routing=config_fields_from_args(RoutingConfig, args),
        api_keys=api_keys_from_args(args),
        admin_key=os.environ.get(args.admin_key_env) or None,  # never on the command line: ps shows it
        metrics_key=os.environ.get(METRICS_KEY_ENV) or None,
    )


def api_keys_from_args(args: argparse.Namespace) -> dict[str, Tenant]:
    """The tenants of ``--api-keys``; an empty file would silently turn authentication off, so it is
    refused unless ``--allow-empty-api-keys`` says that is meant."""
    if not args.api_keys:
        return {}
    try:
        keys = load_api_keys(args.api_keys, lambda: salt_secret(os.environ.get(SALT_SECRET_ENV)))
    except ValueError as exc:
        raise FlagError(f"--api-keys {args.api_keys}: {exc}") from None
    if not keys:
        if not args.allow_empty_api_keys:
            raise FlagError(
                f"--api-keys {args.api_keys} lists no key, which would turn authentication off: add "
                "keys, or pass --allow-empty-api-keys to serve without authentication"
            )
        log.warning("--api-keys %s lists no key: authentication is off", args.api_keys)
    return keys


def check_startup(config: GatewayConfig, procs: int, *, engine_weights: bool = False) -> None:
    """Every check that takes milliseconds, made before anything slow (loading engines or a tokenizer):
    ``--procs``, ``--model`` (an engine loads its weights when ``engine_weights``; else the gateway only
    its tokenizer), and whether ``--host``/``--port`` can be listened on. Raises ``FlagError``."""
    problem = check_procs(procs, config)
    if problem:
        raise FlagError(problem)
    if not (config.ttft_slo_ms > 0 and config.itl_slo_ms > 0):  # NaN fails too
        raise FlagError("--ttft-slo-ms and --itl-slo-ms must be positive milliseconds")
    try:
        check_model_path(config.model, weights=engine_weights)
    except WeightLoadError as exc:
        raise FlagError(f"--model: {exc}") from None
    check_can_listen(config.host, config.port)


def serve_gateway(config: GatewayConfig, procs: int = 1, log_level: str = "info") -> int:
    """Serve until stopped; ``procs`` > 1: that many processes on the port (``gateway.processes``)."""
    if procs > 1:
        return serve_processes(config, procs, functools.partial(serve_one, reuse_port=True), log_level)
    serve_one(config)
    return 0


def serve_one(config: GatewayConfig, reuse_port: bool = False) -> None:
    """One gateway process; ``reuse_port``: it shares the port with its siblings (``--procs``)."""
    workers = len(config.workers) + len(config.prefill_workers) + len(config.decode_workers)
    base = f"http://{f'[{config.host}]' if ':' in config.host else config.host}:{config.port}"

    def listening(_: str) -> None:  # aiohttp calls it once the port is bound
        log.info(
            "gateway listening on %s (policy %s, %d worker%s); dashboard: %s/dashboard",
            base,
            config.routing.policy,
            workers,
            "" if workers == 1 else "s",
            base,
        )

    # handler_cancellation: a client that disconnects cancels its handler, which closes the upstream
    # connection, which makes the worker abort the request and free its KV pages.
    try:
        web.run_app(
            create_app(config),
            host=config.host,
            port=config.port,
            print=listening,
            access_log=None,
            handler_cancellation=True,
            reuse_port=reuse_port,
            **server_options(config),
        )
    except OSError as exc:  # taken since ``check_can_listen`` ran, while the engines loaded
        if exc.errno == errno.EADDRINUSE:
            raise port_taken(config.host, config.port) from None
        raise


def run(args: argparse.Namespace) -> int:
    if not args.workers and not args.worker_dns and not args.prefill_workers and not args.decode_workers:
        raise FlagError(
            "no --worker or --worker-dns given; attach at least one (or use `prefixgate serve` to start engines)"
        )
    config = config_from_args(args, args.workers or [])
    check_startup(config, args.procs)
    return serve_gateway(config, args.procs, args.log_level)
