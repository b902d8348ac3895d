"""API keys -> tenants. A tenant's salt enters the block-hash namespace and the worker's cache key,
so no tenant can hit, or time, another tenant's cached prefixes."""

from __future__ import annotations

import hmac
import json
from pathlib import Path

from aiohttp import web

from cache.api.errors import ApiError
from gateway.config import Tenant

DEFAULT_TENANT = Tenant(name="default", salt="")


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.headers.get("X-API-Key")


def authenticate(request: web.Request, api_keys: dict[str, Tenant]) -> Tenant:
    """The request's tenant; 401 when keys are configured and the request has no valid one."""
    if not api_keys:
        return DEFAULT_TENANT
    token = bearer_token(request)
    if token is not None:
        for key, tenant in api_keys.items():  # constant-time compare: keys are secrets
            if hmac.compare_digest(key.encode(), token.encode()):
                return tenant
    raise ApiError(401, "a valid API key is required (Authorization: Bearer <key>)", code="invalid_api_key")


def require_admin(request: web.Request, admin_key: str | None) -> None:
    if admin_key is None:
        raise ApiError(403, "admin routes are disabled: start the gateway with --admin-key")
    token = bearer_token(request)
    if token is None or not hmac.compare_digest(admin_key.encode(), token.encode()):
        raise ApiError(401, "the admin key is required (Authorization: Bearer <admin key>)")


def load_api_keys(path: str | Path) -> dict[str, Tenant]:
    """A JSON file ``{"<api key>": {"tenant": "name", "salt": "..."}}``; salt defaults to the name."""
    raw = json.loads(Path(path).read_text())
    return {key: Tenant(v["tenant"], v.get("salt", v["tenant"])) for key, v in raw.items()}
