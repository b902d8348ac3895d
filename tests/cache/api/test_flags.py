"""Command-line flags -> frozen configs: every documented flag keeps its name and default."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from cache.api.flags import add_config_arguments, config_from_args
from gateway import run, serve
from gateway.config import GatewayConfig, RoutingConfig


def parse(module: object, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)  # type: ignore[attr-defined]
    return parser.parse_args(argv)


def test_no_flags_give_the_dataclass_defaults() -> None:
    args = parse(run, [])
    assert run.config_from_args(args, args.workers or []) == GatewayConfig()


def test_every_gateway_flag_maps_onto_its_field() -> None:
    argv = ["--host", "0.0.0.0", "--port", "9", "--worker", "http://a", "--worker", "http://b"]
    argv += ["--model", "m.gguf", "--redis", "redis://r", "--redis-key-prefix", "p:", "--no-kv-events"]
    argv += ["--allow-worker-url", "http://10.", "--policy", "round_robin", "--load-cost-tokens", "7"]
    argv += ["--bounded-load-factor", "2.5", "--bounded-load-slack", "4", "--host-tier-weight", "0.25"]
    args = parse(run, argv)
    config = run.config_from_args(args, args.workers)
    assert config == GatewayConfig(
        host="0.0.0.0",
        port=9,
        workers=("http://a", "http://b"),
        model="m.gguf",
        routing=RoutingConfig(
            policy="round_robin",
            load_cost_tokens=7,
            bounded_load_factor=2.5,
            bounded_load_slack=4,
            host_tier_weight=0.25,
        ),
        redis_url="redis://r",
        redis_key_prefix="p:",
        ingest_kv_events=False,
        allowed_worker_urls=("http://10.",),
    )


def test_admin_key_comes_from_the_environment_and_policies_are_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MY_ADMIN_KEY", "secret")
    args = parse(run, ["--admin-key-env", "MY_ADMIN_KEY"])
    assert run.config_from_args(args, []).admin_key == "secret"
    with pytest.raises(SystemExit):
        parse(run, ["--policy", "no-such-policy"])


def test_serve_starts_workers_instead_of_taking_them() -> None:
    args = parse(serve, ["--workers", "3", "--engine-arg=--threads=1", "--policy", "session"])
    assert (args.workers, args.engine_arg, args.startup_timeout) == (3, ["--threads=1"], 600.0)
    config = run.config_from_args(args, ["http://127.0.0.1:1"])
    assert config.workers == ("http://127.0.0.1:1",) and config.routing.policy == "session"


@dataclass(frozen=True)
class Example:
    count: int = field(default=2, metadata={"help": "how many"})
    ratio: float | None = field(default=None, metadata={"help": "a fraction", "metavar": "R"})
    verbose: bool = field(default=False, metadata={"help": "say more"})
    names: tuple[str, ...] = field(default=("a",), metadata={"help": "a name", "flag": "--name"})
    secret: str = "hidden"  # no help: not a flag


def test_the_generic_mapping() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Example, overrides={"count": {"choices": [1, 2, 3]}})
    assert config_from_args(Example, parser.parse_args([])) == Example()
    args = parser.parse_args(["--count", "3", "--ratio", "0.5", "--verbose", "--name", "x", "--name", "y"])
    assert config_from_args(Example, args, secret="s") == Example(3, 0.5, True, ("x", "y"), "s")
    assert config_from_args(Example, args, count=1).count == 1  # an explicit value wins over the flag
    for argv in (["--secret", "s"], ["--count", "4"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
