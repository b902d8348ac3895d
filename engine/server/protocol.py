"""Request bodies -> validated engine inputs. Every rejection is an ``ApiError`` naming the field.

Unknown fields are ignored, as OpenAI-compatible servers do; known fields that this engine cannot
honour (n > 1, logprobs, penalties, tools) are rejected rather than silently dropped, so a client
never gets an answer to a question it did not ask.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from cache.api.errors import ApiError, bad_request
from cache.api.sampling import SamplingParams
from cache.prompt import chat
from cache.prompt.tokenizer import Tokenizer

DEFAULT_MAX_TOKENS = 256  # OpenAI's default is "up to the context"; a bound keeps a bare request cheap


@dataclass(frozen=True)
class GenerationRequest:
    """What one API call asks the engine for, whichever API it came through."""

    prompt_ids: list[int]
    sampling: SamplingParams
    stream: bool = False
    include_usage: bool = False
    cache_salt: str = ""  # vLLM's field: requests share cached prefixes only with the same salt


def get_cache_salt(body: dict) -> str:
    salt = body.get("cache_salt")
    if salt is None:
        return ""
    if not isinstance(salt, str) or not salt:
        raise bad_request("'cache_salt' must be a non-empty string", "cache_salt")
    return salt


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


# -- typed field access ---------------------------------------------------------------------------
def get_int(body: dict, name: str, default: int | None = None, *, minimum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer, got {json.dumps(value)[:40]}", name)
    if minimum is not None and value < minimum:
        raise bad_request(f"'{name}' must be at least {minimum}, got {value}", name)
    return value


def get_float(
    body: dict, name: str, default: float, *, low: float, high: float, open_low: bool = False
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_request(f"'{name}' must be a number, got {json.dumps(value)[:40]}", name)
    if value < low or value > high or (open_low and value == low):
        interval = f"{'(' if open_low else '['}{low}, {high}]"
        raise bad_request(f"'{name}' must be in {interval}, got {value}", name)
    return float(value)


def get_bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be a boolean, got {json.dumps(value)[:40]}", name)
    return value


def get_stop(body: dict, name: str = "stop") -> tuple[str, ...]:
    value = body.get(name)
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad_request(f"'{name}' must be a non-empty string or a list of non-empty strings", name)
    return tuple(items)


def get_token_ids(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise bad_request(f"'{name}' must be a list of token ids (integers)", name)
    return value


def reject_unsupported(body: dict, *, logprob_fields: tuple[str, ...]) -> None:
    """n > 1, logprobs, penalties and best_of are not implemented: say so instead of ignoring them."""
    n = get_int(body, "n", 1, minimum=1)
    if n != 1:
        raise bad_request("only n=1 is supported", "n")
    best_of = get_int(body, "best_of", 1, minimum=1)
    if best_of != 1:
        raise bad_request("only best_of=1 is supported", "best_of")
    for name in logprob_fields:
        if body.get(name) not in (None, False):
            raise bad_request(f"'{name}' is not supported by this engine", name)
    for name in ("presence_penalty", "frequency_penalty"):
        if get_float(body, name, 0.0, low=-2.0, high=2.0) != 0.0:
            raise bad_request(f"'{name}' is not supported by this engine (only 0)", name)
    if body.get("tools"):
        raise bad_request("tool calling is not supported by this engine", "tools")


def sampling_from_openai(body: dict) -> SamplingParams:
    max_tokens = get_int(body, "max_completion_tokens", None)
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = get_int(body, "max_tokens", DEFAULT_MAX_TOKENS), "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"'{name}' must be at least 1, got {max_tokens}", name)
    return SamplingParams(
        max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
        temperature=get_float(body, "temperature", 1.0, low=0.0, high=2.0),
        top_p=get_float(body, "top_p", 1.0, low=0.0, high=1.0, open_low=True),
        top_k=_top_k(body),
        seed=get_int(body, "seed"),
        stop=get_stop(body),
        stop_token_ids=tuple(get_token_ids(body.get("stop_token_ids") or [], "stop_token_ids")),
        ignore_eos=get_bool(body, "ignore_eos"),
    )


def sampling_from_sglang(params: Any) -> SamplingParams:
    """SGLang's ``sampling_params``: max_new_tokens (default 128), temperature, top_p, top_k, stop..."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise bad_request("'sampling_params' must be an object", "sampling_params")
    max_new = get_int(params, "max_new_tokens", 128)
    if max_new is None or max_new < 1:
        raise bad_request(f"'max_new_tokens' must be at least 1, got {max_new}", "max_new_tokens")
    seed = get_int(params, "sampling_seed", None)
    return SamplingParams(
        max_tokens=max_new,
        temperature=get_float(params, "temperature", 1.0, low=0.0, high=100.0),
        top_p=get_float(params, "top_p", 1.0, low=0.0, high=1.0, open_low=True),
        top_k=_top_k(params),
        seed=get_int(params, "seed", seed),
        stop=get_stop(params),
        stop_token_ids=tuple(get_token_ids(params.get("stop_token_ids") or [], "stop_token_ids")),
        ignore_eos=get_bool(params, "ignore_eos"),
    )


def _top_k(body: dict) -> int:
    top_k = get_int(body, "top_k", -1)
    assert top_k is not None
    if top_k == 0 or top_k < -1:
        raise bad_request(f"'top_k' must be -1 (disabled) or >= 1, got {top_k}", "top_k")
    return top_k


# -- prompts --------------------------------------------------------------------------------------
def chat_prompt_ids(tokenizer: Tokenizer, messages: Any) -> list[int]:
    """``cache.prompt.chat.chat_prompt_ids`` (the one path the gateway shares), with its errors as 400s."""
    try:
        return chat.chat_prompt_ids(tokenizer, messages)
    except chat.InvalidMessages as exc:
        raise bad_request(str(exc), "messages") from None


def completion_prompt_ids(tokenizer: Tokenizer, prompt: Any, name: str = "prompt") -> list[int]:
    """A string, a list of token ids, or a one-element list of either (batches are not supported)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=True)
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], str | list):
        return get_token_ids(prompt, name)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise bad_request(f"'{name}' holds several prompts; send one request per prompt", name)
    raise bad_request(f"'{name}' must be a string or a list of token ids", name)


def check_prompt(prompt_ids: list[int], max_model_len: int, vocab_size: int, param: str) -> None:
    if not prompt_ids:
        raise bad_request("the prompt is empty", param)
    if len(prompt_ids) >= max_model_len:
        raise ApiError(
            400,
            f"the prompt has {len(prompt_ids)} tokens; this model's context is {max_model_len} tokens",
            param=param,
            code="context_length_exceeded",
        )
    if any(t < 0 or t >= vocab_size for t in prompt_ids):
        raise bad_request(f"token ids must be in [0, {vocab_size})", param)
