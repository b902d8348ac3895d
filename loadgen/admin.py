"""Calls to the server under test that are not part of the measured traffic."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

log = logging.getLogger(__name__)


class AdminCallError(RuntimeError):
    pass


async def set_gateway_policy(
    session: aiohttp.ClientSession, base_url: str, policy: str, admin_key: str | None
) -> None:
    """Switch a prefixgate gateway's routing policy: ``POST {base}/admin/policy {"policy": name}``.

    The one place that knows the admin route; adapt it here if the gateway's contract changes.
    """
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    async with session.post(f"{base_url}/admin/policy", json={"policy": policy}, headers=headers) as response:
        if response.status >= 300:
            body = (await response.text())[:500]
            raise AdminCallError(
                f"setting gateway policy {policy!r} at {base_url}/admin/policy failed: HTTP {response.status} "
                f"{body}; is PREFIXGATE_ADMIN_KEY set and is {base_url} a prefixgate gateway?"
            )
    log.info("gateway %s: routing policy set to %s", base_url, policy)


async def flush_cache(session: aiohttp.ClientSession, base_url: str, admin_key: str | None = None) -> bool:
    """SGLang's ``POST /flush_cache`` (engine and gateway serve it), so each compared run starts cold.

    Returns False, with a warning, when the server has no such route: its cache then stays warm.
    """
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    try:
        async with session.post(f"{base_url}/flush_cache", headers=headers) as response:
            if response.status < 300:
                return True
            log.warning(
                "%s/flush_cache answered HTTP %d: its prefix cache may still be warm",
                base_url,
                response.status,
            )
    except aiohttp.ClientError as exc:
        log.warning("%s/flush_cache failed (%s): its prefix cache may still be warm", base_url, exc)
    return False


class TargetUnreachable(RuntimeError):
    """The target did not answer at all (refused, unresolvable, timed out)."""


async def check_reachable(session: aiohttp.ClientSession, base_url: str, headers: dict[str, str]) -> None:
    """Fail fast, before building a workload, when nothing listens at ``base_url``."""
    try:
        async with session.get(
            f"{base_url}/v1/models", headers=headers, timeout=aiohttp.ClientTimeout(total=10)
        ):
            return
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        hint = " (prefixgate serve listens on http://127.0.0.1:8080; set --base-url)"
        raise TargetUnreachable(f"cannot reach {base_url}: {type(exc).__name__}: {exc}{hint}") from None


async def first_model_id(
    session: aiohttp.ClientSession, base_url: str, headers: dict[str, str]
) -> str | None:
    """The first id from ``GET /v1/models``, as bench_serving does when no ``--model`` is given."""
    try:
        async with session.get(f"{base_url}/v1/models", headers=headers) as response:
            if response.status != 200:
                return None
            data = await response.json()
    except (aiohttp.ClientError, ValueError):
        return None
    models = data.get("data") or []
    return models[0].get("id") if models else None
