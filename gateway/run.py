"""``prefixgate gateway --worker URL ...``: the gateway in front of workers that already run."""

from __future__ import annotations

import argparse
import logging
import os

from aiohttp import web

from gateway.app import create_app
from gateway.config import GatewayConfig, RoutingConfig
from gateway.policies import POLICIES
from gateway.tenancy import load_api_keys

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, workers_required: bool = True) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8080)
    if workers_required:
        parser.add_argument(
            "--worker",
            action="append",
            default=[],
            metavar="URL",
            help="a worker's base URL (our engine, SGLang, or any OpenAI-compatible server)",
        )
    parser.add_argument(
        "--model", default=None, help="tokenizer source (.gguf or HF dir); default: bundled model"
    )
    parser.add_argument("--policy", default="cache_aware", choices=sorted(POLICIES))
    parser.add_argument("--load-cost-tokens", type=int, default=RoutingConfig.load_cost_tokens)
    parser.add_argument("--bounded-load-factor", type=float, default=RoutingConfig.bounded_load_factor)
    parser.add_argument("--bounded-load-slack", type=int, default=RoutingConfig.bounded_load_slack)
    parser.add_argument("--host-tier-weight", type=float, default=RoutingConfig.host_tier_weight)
    parser.add_argument("--redis", default=None, metavar="URL", help="share the index with other replicas")
    parser.add_argument("--redis-key-prefix", default="prefixgate:")
    parser.add_argument("--no-kv-events", action="store_true", help="do not subscribe to workers' KV events")
    parser.add_argument(
        "--api-keys",
        default=None,
        metavar="FILE",
        help='JSON {"<key>": {"tenant": "name", "salt": "..."}}; requests then need a key',
    )
    parser.add_argument(
        "--admin-key-env",
        default="PREFIXGATE_ADMIN_KEY",
        help="environment variable holding the admin key (admin routes are off without it)",
    )
    parser.add_argument(
        "--allow-worker-url",
        action="append",
        default=[],
        metavar="PREFIX",
        help="URL prefix admins may attach (default: loopback only)",
    )


def config_from_args(args: argparse.Namespace, workers: list[str]) -> GatewayConfig:
    routing = RoutingConfig(
        policy=args.policy,
        load_cost_tokens=args.load_cost_tokens,
        bounded_load_factor=args.bounded_load_factor,
        bounded_load_slack=args.bounded_load_slack,
        host_tier_weight=args.host_tier_weight,
    )
    extra = {"allowed_worker_urls": tuple(args.allow_worker_url)} if args.allow_worker_url else {}
    return GatewayConfig(
        host=args.host,
        port=args.port,
        workers=tuple(workers),
        model=args.model,
        routing=routing,
        redis_url=args.redis,
        redis_key_prefix=args.redis_key_prefix,
        ingest_kv_events=not args.no_kv_events,
        api_keys=load_api_keys(args.api_keys) if args.api_keys else {},
        admin_key=os.environ.get(args.admin_key_env) or None,  # never on the command line: ps shows it
        **extra,
    )


def serve_gateway(config: GatewayConfig) -> None:
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
    )


def run(args: argparse.Namespace) -> int:
    if not args.worker:
        log.error("no --worker given; attach at least one (or use `prefixgate serve` to start engines)")
        return 2
    serve_gateway(config_from_args(args, args.worker))
    return 0
