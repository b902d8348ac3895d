"""Prompt-cache retention: what the gateway asks our engine workers to hold, and for how long.

Clients say how long a prefix should stay cached: OpenAI's ``prompt_cache_retention`` (chat, Responses:
``in_memory`` or ``24h``) for the whole prompt, Anthropic's ``cache_control`` ttl (``5m``, ``1h``) for
the prefix up to each breakpoint. The gateway turns that into the engine's ``kv_pin`` field
(``cache.api.kv_fields.KVPin``: ``{"ttl_s", "tokens"}``), each ttl bounded by ``--max-retention-s``,
and sends it to workers of our engine only (``Dispatcher``): there the prefix stays in the device
pool for that long (``engine.kv.retention``), within the engine's per-namespace budget — one tenant's,
since the gateway sends each tenant's salt as the namespace — and its overall one. Other workers get the
client's fields as they are and keep their own cache policy.
"""

from __future__ import annotations

from typing import Any

from cache.api.errors import bad_request

# OpenAI's in-memory retention keeps a prefix "5 to 10 minutes of inactivity"; extended, up to 24 hours.
OPENAI_RETENTION_S = {"in_memory": 600.0, "in-memory": 600.0, "24h": 86400.0}


def openai_pins(body: dict[str, Any], max_retention_s: float) -> list[dict[str, Any]]:
    """The ``kv_pin`` for a chat (or translated Responses) body's ``prompt_cache_retention``: the whole
    prompt for that long; none without it. An unknown value is a 400."""
    value = body.get("prompt_cache_retention")
    if value is None:
        return []
    if not isinstance(value, str) or value not in OPENAI_RETENTION_S:  # a list is unhashable
        raise bad_request("'prompt_cache_retention' must be 'in_memory' or '24h'", "prompt_cache_retention")
    ttl_s = min(OPENAI_RETENTION_S[value], max_retention_s)
    return [{"ttl_s": ttl_s}] if ttl_s > 0 else []


def breakpoint_pins(breakpoints: list[tuple[int, float]], max_retention_s: float) -> list[dict[str, Any]]:
    """The ``kv_pin`` for cache breakpoints ``(prefix tokens, ttl)``: one pin per breakpoint that no
    longer-or-equal prefix held at least as long covers (with Anthropic's two ttls, at most two)."""
    bounded = {(tokens, min(ttl_s, max_retention_s)) for tokens, ttl_s in breakpoints}
    kept = [
        (tokens, ttl_s)
        for tokens, ttl_s in bounded
        if tokens > 0
        and ttl_s > 0
        and not any(t >= tokens and s >= ttl_s and (t, s) != (tokens, ttl_s) for t, s in bounded)
    ]
    return [{"tokens": tokens, "ttl_s": ttl_s} for tokens, ttl_s in sorted(kept)]


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading token ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
