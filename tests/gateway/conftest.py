"""Gateway fixtures: real engine workers (subprocesses, the real model) and real gateways on loopback."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import GatewayConfig, RoutingConfig
from gateway.serve import engine_workers

# Small pools keep two workers' memory modest; a small step budget keeps steps short.
ENGINE_ARGS = ["--kv-cache-tokens", "16384", "--max-batch-tokens", "256"]


@pytest.fixture(scope="session")
def two_workers() -> Iterator[list[str]]:
    """Two embedded engine workers with KV events, shared by the gateway tests (load once)."""
    with engine_workers(2, None, ENGINE_ARGS, timeout=300) as launched:
        yield [w.url for w in launched]


@contextlib.asynccontextmanager
async def running_gateway(config: GatewayConfig) -> AsyncIterator[tuple[str, web.Application]]:
    app = create_app(config)
    server = TestServer(app, host="127.0.0.1", handler_cancellation=True)  # as `prefixgate serve` runs
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}", app
    finally:
        await server.close()


GatewayFactory = Callable[..., contextlib.AbstractAsyncContextManager[tuple[str, web.Application]]]


@pytest.fixture
def gateway() -> GatewayFactory:
    def factory(workers: list[str], policy: str = "cache_aware", **overrides: object):
        routing = RoutingConfig(policy=policy, **overrides.pop("routing", {}))  # type: ignore[arg-type]
        config = GatewayConfig(workers=tuple(workers), routing=routing, health_interval_s=0.5, **overrides)  # type: ignore[arg-type]
        return running_gateway(config)

    return factory
