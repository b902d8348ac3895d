"""The request fields about the KV cache itself rather than about sampling: the tenant's
``cache_salt``, the gateway's ``kv_fetch_plan`` (``FetchPlan``), vLLM's ``kv_transfer_params`` for
prefill/decode disaggregation, and retention pins (``kv_pin``: ``KVPin``).

They are separate from ``cache.api.requests`` because they are a contract of their own between the
gateway (which writes plans and pins, ``gateway.fetch_plans``, ``gateway.retention``) and the engine's
KV transfer and retention code (which reads them), with bounds on what each costs the engine: a
prefix-cache root per salt, blocks per plan, pins per request. Every check is on shape only; whether a
plan is still good is the worker's to decide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cache.api.errors import bad_request
from cache.api.fields import MAX_RID_CHARS, get_float, get_int

MAX_CACHE_SALT_CHARS = 256  # the engine keeps a prefix-cache root per salt while it caches pages
MAX_FETCH_PLAN_BLOCKS = 8192  # a fetch plan names at most this many blocks (128k tokens of 16-token pages)
MAX_FETCH_ENDPOINT_CHARS = 512
MAX_KV_PINS = 4  # Anthropic's bound on cache_control breakpoints
MAX_KV_PIN_TTL_S = 7 * 86400.0


@dataclass(frozen=True)
class KVPin:
    """A retention pin (body field ``kv_pin``, set by the gateway only: OpenAI's ``prompt_cache_retention``,
    Anthropic's ``cache_control`` ttl): once the prompt is prefilled, the engine holds the cached KV of its
    first ``tokens`` tokens (whole pages; the whole prompt when None) for ``ttl_s`` seconds, within its
    pin budgets (``engine.kv.retention``). Other servers ignore the field."""

    ttl_s: float
    tokens: int | None = None


@dataclass(frozen=True)
class FetchPlan:
    """Where a cached prefix of this request's prompt lives, attached by the gateway (body field
    ``kv_fetch_plan``; names follow SGLang's shared-HiCache plan). The worker pulls the first
    ``planned_prefix_blocks`` of ``block_hashes`` (the prompt's chained block hashes in ``namespace``)
    from ``source_endpoint`` before prefilling; any failure means recomputing, never a failed request.
    ``namespace`` is the tenant salt the blocks belong to: it must equal the request's ``cache_salt``.
    Only a structurally malformed plan is a 400; an expired or wrong one is the worker's to refuse."""

    plan_id: str
    source_endpoint: str  # the source engine's HTTP base URL, e.g. "http://10.0.0.5:30001"
    block_hashes: tuple[int, ...]
    planned_prefix_blocks: int
    expires_at_ms: int  # Unix time in milliseconds after which the plan must not be used
    namespace: str = ""


def get_cache_salt(body: dict[str, Any]) -> str:
    salt = body.get("cache_salt")
    if salt is None:
        return ""
    if not isinstance(salt, str) or not salt or len(salt) > MAX_CACHE_SALT_CHARS:
        message = f"'cache_salt' must be a non-empty string of at most {MAX_CACHE_SALT_CHARS} characters"
        raise bad_request(message, "cache_salt")
    return salt


def get_kv_transfer(body: dict[str, Any]) -> tuple[FetchPlan | None, bool]:
    """The request's part in a KV transfer: a fetch plan (``kv_fetch_plan``, or vLLM-style
    ``kv_transfer_params`` with ``do_remote_prefill``: the decode side of a disaggregated request), and
    whether it is the prefill side of one (``kv_transfer_params.do_remote_decode``)."""
    plan = get_fetch_plan(body)
    params = body.get("kv_transfer_params")
    if params is None:
        return plan, False
    name = "kv_transfer_params"
    if not isinstance(params, dict):
        raise bad_request(f"'{name}' must be an object", name)
    remote_prefill, remote_decode = params.get("do_remote_prefill"), params.get("do_remote_decode")
    if not all(v is None or isinstance(v, bool) for v in (remote_prefill, remote_decode)):
        raise bad_request(f"'{name}.do_remote_prefill' and '.do_remote_decode' must be booleans", name)
    if remote_prefill and remote_decode:
        raise bad_request(f"'{name}' cannot ask for both a remote prefill and a remote decode", name)
    if not remote_prefill:
        return plan, remote_decode
    if plan is not None:
        raise bad_request(f"'{name}' with do_remote_prefill and 'kv_fetch_plan' are exclusive", name)
    host, port = params.get("remote_host"), params.get("remote_port")
    if not isinstance(host, str) or not host or len(host) > 255 or any(c in host for c in "/@?#[] "):
        raise bad_request(f"'{name}.remote_host' must be a host name or an IPv4 address", name)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise bad_request(f"'{name}.remote_port' must be a TCP port", name)
    hashes, rid = params.get("remote_block_ids"), params.get("remote_request_id")
    if not isinstance(hashes, list):
        raise bad_request(f"'{name}.remote_block_ids' must be an array of block hashes", name)
    if not hashes:
        return None, False  # the prompt is shorter than a page: nothing to pull
    return get_fetch_plan(
        {
            "kv_fetch_plan": {
                "plan_id": rid if isinstance(rid, str) and rid else "remote-prefill",
                "source_endpoint": f"http://{host}:{port}",
                "block_hashes": hashes,
                "expires_at_ms": params.get("expires_at_ms", 2**62),  # vLLM's carry none
                "namespace": get_cache_salt(body),
            }
        },
        name,
    ), False


def get_kv_pins(body: dict[str, Any], name: str = "kv_pin") -> tuple[KVPin, ...]:
    """``kv_pin``: one ``{"ttl_s": seconds, "tokens": prompt tokens (optional)}`` or a list of at most
    ``MAX_KV_PINS`` of them (one per cache breakpoint)."""
    value = body.get(name)
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if len(items) > MAX_KV_PINS:
        raise bad_request(f"'{name}' holds at most {MAX_KV_PINS} pins", name)
    pins = []
    for item in items:
        if not isinstance(item, dict):
            raise bad_request(f"'{name}' must be an object or a list of objects", name)
        if item.get("ttl_s") is None:
            raise bad_request(f"'{name}.ttl_s' is required", name)
        ttl = get_float(item, "ttl_s", 0.0, low=0.0, high=MAX_KV_PIN_TTL_S, open_low=True)
        pins.append(KVPin(ttl, get_int(item, "tokens", None, minimum=1)))
    return tuple(pins)


def get_fetch_plan(body: dict[str, Any], name: str = "kv_fetch_plan") -> FetchPlan | None:
    """The optional ``kv_fetch_plan`` object (``FetchPlan``), checked for shape only."""
    plan = body.get("kv_fetch_plan")
    if plan is None:
        return None
    if not isinstance(plan, dict):
        raise bad_request(f"'{name}' must be an object", name)
    plan_id, endpoint, namespace = plan.get("plan_id"), plan.get("source_endpoint"), plan.get("namespace", "")
    if not isinstance(plan_id, str) or not plan_id or len(plan_id) > MAX_RID_CHARS:
        raise bad_request(
            f"'{name}.plan_id' must be a non-empty string of at most {MAX_RID_CHARS} characters", name
        )
    if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
        raise bad_request(f"'{name}.source_endpoint' must be an http(s) URL", name)
    if len(endpoint) > MAX_FETCH_ENDPOINT_CHARS:
        raise bad_request(
            f"'{name}.source_endpoint' is longer than {MAX_FETCH_ENDPOINT_CHARS} characters", name
        )
    if not isinstance(namespace, str) or len(namespace) > MAX_CACHE_SALT_CHARS:
        raise bad_request(
            f"'{name}.namespace' must be a string of at most {MAX_CACHE_SALT_CHARS} characters", name
        )
    hashes = plan.get("block_hashes")
    if (
        not isinstance(hashes, list)
        or not 0 < len(hashes) <= MAX_FETCH_PLAN_BLOCKS
        or not all(isinstance(h, int) and not isinstance(h, bool) and 0 <= h < 2**64 for h in hashes)
    ):
        message = f"'{name}.block_hashes' must be 1 to {MAX_FETCH_PLAN_BLOCKS} unsigned 64-bit integers"
        raise bad_request(message, name)
    blocks = get_int(plan, "planned_prefix_blocks", len(hashes), minimum=1)
    expires = get_int(plan, "expires_at_ms", minimum=0)
    assert blocks is not None
    if blocks > len(hashes):
        raise bad_request(f"'{name}.planned_prefix_blocks' exceeds the {len(hashes)} block hashes", name)
    if expires is None:
        raise bad_request(f"'{name}.expires_at_ms' is required", name)
    return FetchPlan(plan_id, endpoint.rstrip("/"), tuple(hashes), blocks, expires, namespace)
