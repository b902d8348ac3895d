"""Typed, bounded access to a request body's fields, and the body itself.

The primitives every request parser in ``cache.api`` builds on: reading a body as a JSON object,
and one getter per JSON type (integers, finite numbers in a range, booleans, seeds, stop strings,
token ids) that returns the value or raises a 400 ``ApiError`` naming the field. They know nothing of
which API a field belongs to, so they live apart from the parsers that do (``cache.api.requests``,
``cache.api.sampling_fields``, ``cache.api.kv_fields``).

Hostile input: a body that is not valid JSON, nests too deeply for the parser, or holds a string
that is not valid Unicode is a 400, never a 500; lists and strings that cost work per generated token
are bounded (stop strings, stop token ids); error messages show at most a short prefix of the value.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from aiohttp import web

from cache.api.errors import bad_request
from cache.api.sampling import SEED_RANGE

# Bounds on what costs work per generated token or memory per distinct value (vLLM leaves these
# unbounded; OpenAI allows 4 stop strings).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024  # per stop string: the stream holds back up to this much text
MAX_STOP_TOKEN_IDS = 256
MAX_RID_CHARS = 256  # SGLang's ``rid``, and a fetch plan's ``plan_id``
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # JSON escapes of UTF-16 surrogates


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object (aiohttp enforces ``client_max_size`` with a 413)."""
    return parse_json(await request.read())


def parse_json(raw: bytes) -> dict[str, Any]:
    """A JSON object whose strings are all valid Unicode (they can be encoded, tokenized and hashed),
    or a 400: never an exception the caller did not ask for."""
    try:
        body = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw):  # only escapes can smuggle lone surrogates into a str
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request("the request body holds a string with a lone UTF-16 surrogate") from None
    return body


def show_value(value: Any) -> str:
    """A short, always-printable description of a client's value for an error message."""
    if isinstance(value, dict | list):
        return f"an {type(value).__name__.replace('dict', 'object').replace('list', 'array')}"
    if isinstance(value, str):
        return json.dumps(value[:40])
    return json.dumps(value)[:40] if not isinstance(value, int) or abs(value) < 10**40 else "a huge integer"


def get_int(
    body: dict[str, Any], name: str, default: int | None = None, *, minimum: int | None = None
) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer, got {show_value(value)}", name)
    if minimum is not None and value < minimum:
        raise bad_request(f"'{name}' must be at least {minimum}, got {show_value(value)}", name)
    return value


def get_seed(body: dict[str, Any], name: str, default: int | None = None) -> int | None:
    seed = get_int(body, name, default)
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise bad_request(f"'{name}' must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]", name)
    return seed


def get_float(
    body: dict[str, Any], name: str, default: float, *, low: float, high: float, open_low: bool = False
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not is_finite(value):
        raise bad_request(f"'{name}' must be a finite number, got {show_value(value)}", name)
    if value < low or value > high or (open_low and value == low):
        interval = f"{'(' if open_low else '['}{low}, {high}]"
        raise bad_request(f"'{name}' must be in {interval}, got {show_value(value)}", name)
    return float(value)


def is_finite(value: int | float) -> bool:
    return abs(value) < 2**1000 if isinstance(value, int) else math.isfinite(value)  # no OverflowError


def get_bool(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be a boolean, got {show_value(value)}", name)
    return value


def get_stop(body: dict[str, Any], name: str = "stop") -> tuple[str, ...]:
    value = body.get(name)
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad_request(f"'{name}' must be a non-empty string or a list of non-empty strings", name)
    if len(items) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in items):
        limit = f"at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters"
        raise bad_request(f"'{name}' must hold {limit}", name)
    return tuple(items)


def get_stop_token_ids(body: dict[str, Any], name: str = "stop_token_ids") -> tuple[int, ...]:
    value = body.get(name)
    ids = get_token_ids([] if value is None else value, name)
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise bad_request(f"'{name}' must hold at most {MAX_STOP_TOKEN_IDS} token ids", name)
    if any(t < 0 for t in ids):
        raise bad_request(f"'{name}' must hold token ids >= 0", name)
    return tuple(ids)


def get_token_ids(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise bad_request(f"'{name}' must be a list of token ids (integers)", name)
    return value
