"""Gateway fixtures: the real tokenizer (loaded once), real engine workers (subprocesses, the real model)
and real gateways on loopback."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from aiohttp import web

from cache.prompt.tokenizer import Tokenizer
from gateway.app import create_app, server_options
from gateway.config import GatewayConfig, RoutingConfig
from gateway.launcher import engine_workers

# Small pools keep two workers' memory modest; a small step budget keeps steps short.
ENGINE_ARGS = ["--kv-cache-tokens", "16384", "--max-batch-tokens", "256"]


@pytest.fixture(scope="session")
def tokenizer(smollm2_tokenizer: Tokenizer) -> Tokenizer:
    """The bundled model's tokenizer (loaded once a session), shared by every gateway of the session."""
    return smollm2_tokenizer


@pytest.fixture(scope="session")
def two_workers() -> Iterator[list[str]]:
    """Two embedded engine workers with KV events, shared by the gateway tests (load once)."""
    with engine_workers(2, None, ENGINE_ARGS, timeout=300) as launched:
        yield [w.url for w in launched]


@contextlib.asynccontextmanager
async def running_gateway(
    config: GatewayConfig, tokenizer: Tokenizer | None = None, handler_cancellation: bool = True
) -> AsyncIterator[tuple[str, web.Application]]:
    """A real gateway on loopback; ``handler_cancellation`` as `prefixgate serve` runs it by default
    (aiohttp's ``TestServer`` always turns it on, hence a runner of our own)."""
    app = create_app(config, tokenizer)
    runner = web.AppRunner(
        app, handler_cancellation=handler_cancellation, access_log=None, **server_options(config)
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}", app
    finally:
        await runner.cleanup()


GatewayFactory = Callable[..., contextlib.AbstractAsyncContextManager[tuple[str, web.Application]]]


@pytest.fixture
def gateway(tokenizer: Tokenizer) -> GatewayFactory:
    def factory(workers: list[str], policy: str = "cache_aware", **overrides: object):
        routing = RoutingConfig(policy=policy, **overrides.pop("routing", {}))  # type: ignore[arg-type]
        config = GatewayConfig(workers=tuple(workers), routing=routing, health_interval_s=0.5, **overrides)  # type: ignore[arg-type]
        return running_gateway(config, tokenizer)

    return factory
