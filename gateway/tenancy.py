"""API keys -> tenants. A tenant's salt enters the block-hash namespace and the worker's cache key,
so no tenant can hit, or time, another tenant's cached prefixes.

Salts are derived, never configured in the clear: ``derive_salt(secret, name)`` is HMAC-SHA256 keyed by a
server secret (``PREFIXGATE_SALT_SECRET``), so knowing a tenant's name (or the salt it asked for in the
keys file) does not reveal its namespace. Replicas that share an index must share the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from cache.api.errors import ApiError
from gateway.config import Tenant

log = logging.getLogger(__name__)

DEFAULT_TENANT = Tenant(name="default", salt="")  # no keys: one tenant, nothing to keep apart
SALT_SECRET_ENV = "PREFIXGATE_SALT_SECRET"
METRICS_KEY_ENV = "PREFIXGATE_METRICS_KEY"


def bearer_token(request: web.Request) -> str | None:
    """The request's key (``Authorization: Bearer`` or ``X-API-Key``); None when absent or not ASCII
    (keys are ASCII: anything else is no key, a 401, never an encoding error)."""
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        token: str | None = header[7:].strip() or None
    else:
        token = request.headers.get("X-API-Key")
    return token if token is not None and token.isascii() else None


def _matches(key: str, token: str | None) -> bool:
    return token is not None and hmac.compare_digest(key.encode(), token.encode())  # constant time


def authenticate(request: web.Request, api_keys: dict[str, Tenant]) -> Tenant:
    """The request's tenant; 401 when keys are configured and the request has no valid one."""
    if not api_keys:
        return DEFAULT_TENANT
    token = bearer_token(request)
    for key, tenant in api_keys.items():  # every key is compared: no early exit to time
        if _matches(key, token):
            return tenant
    raise ApiError(401, "a valid API key is required (Authorization: Bearer <key>)", code="invalid_api_key")


def require_admin(request: web.Request, admin_key: str | None) -> None:
    if admin_key is None:
        raise ApiError(403, "admin routes are disabled: start the gateway with --admin-key")
    if not _matches(admin_key, bearer_token(request)):
        raise ApiError(401, "the admin key is required (Authorization: Bearer <admin key>)")


def require_observer(
    request: web.Request, api_keys: dict[str, Tenant], admin_key: str | None, metrics_key: str | None
) -> None:
    """/stats, /metrics: they name tenants, request ids, workers and event sockets. Open when the gateway
    has no API keys (loopback, one tenant); otherwise the admin key or the read-only metrics key."""
    if not api_keys:
        return
    if admin_key is None and metrics_key is None:
        raise ApiError(403, f"observability routes need the admin key or {METRICS_KEY_ENV} when keys are set")
    token = bearer_token(request)
    if any(key is not None and _matches(key, token) for key in (admin_key, metrics_key)):
        return
    raise ApiError(401, "the admin or metrics key is required (Authorization: Bearer <key>)")


def derive_salt(secret: bytes, name: str) -> str:
    """The tenant's namespace salt: HMAC-SHA256(secret, name), hex. Equal names and secrets give equal
    salts (replicas agree); without the secret it cannot be guessed from the name."""
    return hmac.new(secret, name.encode(), hashlib.sha256).hexdigest()


def salt_secret(value: str | None) -> bytes:
    """The server secret for ``derive_salt``: ``value`` (from ``PREFIXGATE_SALT_SECRET``), or a random
    one for this process, with a warning (replicas would then name the same tenant's blocks differently)."""
    if value:
        return value.encode()
    log.warning(
        "%s is not set: tenant salts use a random per-process secret; gateway replicas sharing an index "
        "must share one secret, and restarts change every tenant's namespace",
        SALT_SECRET_ENV,
    )
    return secrets.token_bytes(32)


KEY_FIELDS = ("tenant", "salt")


def _json_kind(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    kinds = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}
    return kinds.get(type(value), type(value).__name__)


def load_api_keys(path: str | Path, secret: bytes | Callable[[], bytes]) -> dict[str, Tenant]:
    """A JSON file ``{"<api key>": {"tenant": "name", "salt": "..."}}``. The salt (default: the tenant's
    name; keys that give the same one share a namespace) is keyed with ``secret`` by ``derive_salt``.

    Raises ValueError saying what is wrong with the file (entries are named by position: keys are
    secrets and never appear in a message). An empty object is returned as is: the caller decides
    whether a gateway without keys may start. ``secret`` may be a function, called only when the file
    has keys (``salt_secret`` warns when the secret is missing: not worth saying for an unusable file)."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f'expected a JSON object {{"<key>": {{"tenant": "name"}}}}, not {_json_kind(raw)}')
    entries = []
    for position, (key, entry) in enumerate(raw.items(), 1):
        where = f"entry {position}"
        if not key or not key.isascii() or key != key.strip():
            raise ValueError(f"{where}: a key must be non-empty ASCII without surrounding spaces")
        if not isinstance(entry, dict):
            raise ValueError(
                f'{where}: expected {{"tenant": "name", "salt": "..."}}, not {_json_kind(entry)}'
            )
        unknown = sorted(set(entry) - set(KEY_FIELDS))
        if unknown:
            raise ValueError(
                f"{where}: unknown field {unknown[0]!r} (the fields are: {', '.join(KEY_FIELDS)})"
            )
        tenant, salt = entry.get("tenant"), entry.get("salt", entry.get("tenant"))
        if not isinstance(tenant, str) or not tenant:
            raise ValueError(f'{where}: "tenant" must be a non-empty string')
        if not isinstance(salt, str):
            raise ValueError(f'{where}: "salt" must be a string')
        entries.append((key, tenant, salt))
    if not entries:
        return {}
    key_bytes = secret() if callable(secret) else secret
    return {key: Tenant(tenant, derive_salt(key_bytes, salt)) for key, tenant, salt in entries}
