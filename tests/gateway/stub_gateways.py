"""Gateways over stub workers (``tests.gateway.test_dispatch.StubWorker``) with the knobs the API-surface
tests need: API keys, a shared Redis, several replicas over the same stubs."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import redis
from aiohttp import web
from aiohttp.test_utils import TestServer

from cache.prompt.tokenizer import Tokenizer
from gateway.config import GatewayConfig, RoutingConfig, Tenant
from tests.gateway.conftest import running_gateway
from tests.gateway.test_dispatch import StubWorker

REDIS_URL = "redis://127.0.0.1:6379/0"


@contextlib.asynccontextmanager
async def gateways_over(
    tokenizer: Tokenizer,
    stubs: list[StubWorker],
    replicas: int = 1,
    redis_shared: bool = False,
    api_keys: dict[str, Tenant] | None = None,
) -> AsyncIterator[list[tuple[str, web.Application]]]:
    """``replicas`` gateways over ``stubs`` (round robin), sharing a fresh Redis key prefix if asked."""
    prefix = f"prefixgate-test-{uuid.uuid4().hex[:8]}:"
    try:
        async with contextlib.AsyncExitStack() as stack:
            servers = [await stack.enter_async_context(TestServer(s.app(), host="127.0.0.1")) for s in stubs]
            config = GatewayConfig(
                workers=tuple(str(s.make_url("")) for s in servers),
                routing=RoutingConfig(policy="round_robin"),
                health_interval_s=3600,
                api_keys=api_keys or {},
                redis_url=REDIS_URL if redis_shared else None,
                redis_key_prefix=prefix,
                ingest_kv_events=False,
            )
            yield [
                await stack.enter_async_context(running_gateway(config, tokenizer)) for _ in range(replicas)
            ]
    finally:
        if redis_shared:
            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=prefix + "*"))
            if keys:
                client.delete(*keys)
            client.close()
