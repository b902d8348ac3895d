"""The sampling fields of a request body -> ``SamplingParams`` (``cache.api.sampling``).

OpenAI's fields (``sampling_from_openai``) and SGLang's ``sampling_params`` (``sampling_from_sglang``)
are read on every side. The fields only the embedded engine reads (``n``, logprobs, penalties,
``logit_bias``: ``engine_sampling``) and the rejection of what it cannot honour (``reject_unsupported``)
apply only when ``ServingLimits.engine_features`` is set: the gateway leaves them to whichever upstream
it forwards to, which may draw their ranges differently. Every value is checked against OpenAI's (or
vLLM's) range before it reaches the sampler, and a refusal is a 400 naming the field.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from cache.api.errors import bad_request
from cache.api.fields import (
    get_bool,
    get_float,
    get_int,
    get_seed,
    get_stop,
    get_stop_token_ids,
    is_finite,
    show_value,
)
from cache.api.sampling import (
    LOGIT_BIAS_RANGE,
    MAX_LOGIT_BIAS,
    MAX_N,
    MAX_REPETITION_PENALTY,
    MAX_TOP_LOGPROBS,
    PENALTY_RANGE,
    SEED_RANGE,
    SamplingParams,
)

if TYPE_CHECKING:  # annotations only: ``cache.api.requests`` imports this module
    from cache.api.requests import Kind, ServingLimits

DEFAULT_MAX_TOKENS = 256  # OpenAI's default is "up to the context"; a bound keeps a bare request cheap
SGLANG_DEFAULT_MAX_NEW_TOKENS = 128
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound for the completions route's ``logprobs``


def sampling_from_openai(body: dict[str, Any]) -> SamplingParams:
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
        seed=get_seed(body, "seed"),
        stop=get_stop(body),
        stop_token_ids=get_stop_token_ids(body),
        ignore_eos=get_bool(body, "ignore_eos"),
    )


def sampling_from_sglang(params: Any) -> SamplingParams:
    """SGLang's ``sampling_params``: max_new_tokens (default 128), temperature, top_p, top_k, stop..."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise bad_request("'sampling_params' must be an object", "sampling_params")
    max_new = get_int(params, "max_new_tokens", SGLANG_DEFAULT_MAX_NEW_TOKENS)
    if max_new is None or max_new < 1:
        raise bad_request(f"'max_new_tokens' must be at least 1, got {max_new}", "max_new_tokens")
    seed = get_seed(params, "sampling_seed")
    return SamplingParams(
        max_tokens=max_new,
        temperature=get_float(params, "temperature", 1.0, low=0.0, high=100.0),
        top_p=get_float(params, "top_p", 1.0, low=0.0, high=1.0, open_low=True),
        top_k=_top_k(params),
        seed=get_seed(params, "seed", seed),
        stop=get_stop(params),
        stop_token_ids=get_stop_token_ids(params),
        ignore_eos=get_bool(params, "ignore_eos"),
    )


def reject_unsupported(body: dict[str, Any], *, chat: bool) -> None:
    """best_of, echo (prompt logprobs) and response formats are not implemented: say so instead of
    ignoring them."""
    if get_int(body, "best_of", 1, minimum=1) != 1:
        raise bad_request("only best_of=1 is supported", "best_of")
    if not chat and body.get("echo") not in (None, False):
        raise bad_request("'echo' is not supported by this engine", "echo")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise bad_request("only response_format {'type': 'text'} is supported", "response_format")
    reject_unsupported_sampling(body)


_NEUTRAL_SAMPLING = {"min_p": 0.0, "min_tokens": 0}  # vLLM's extra fields


def reject_unsupported_sampling(params: dict[str, Any]) -> None:
    """vLLM/SGLang sampling extensions the engine does not implement, unless they ask for nothing."""
    if not isinstance(params, dict):
        return  # reported by the parser of the enclosing object
    for name, neutral in _NEUTRAL_SAMPLING.items():
        if params.get(name) not in (None, neutral):
            raise bad_request(f"'{name}' is not supported by this engine (only {neutral})", name)


def engine_sampling(
    kind: Kind, body: dict[str, Any], sampling: SamplingParams, limits: ServingLimits
) -> SamplingParams:
    """``sampling`` plus what only the embedded engine reads: ``n`` (OpenAI routes), logprobs
    (chat ``logprobs``/``top_logprobs``, completions ``logprobs``, SGLang ``return_logprob``/
    ``top_logprobs_num``), ``presence_penalty``, ``frequency_penalty``, ``repetition_penalty`` and
    ``logit_bias`` (SGLang: inside ``sampling_params``), each checked against OpenAI's ranges."""
    if kind == "generate":
        params = body.get("sampling_params") or {}
        if get_int(params, "n", 1, minimum=1) != 1:
            raise bad_request("/generate samples one choice; use the OpenAI routes for n > 1", "n")
        n, logprobs = 1, _sglang_logprobs(body)
    else:
        params = body
        n = get_int(body, "n", 1, minimum=1) or 1
        if n > MAX_N:
            raise bad_request(f"'n' must be at most {MAX_N}, got {n}", "n")
        logprobs = _openai_logprobs(body, chat=kind == "chat")
    if sampling.seed is not None and sampling.seed + n - 1 > SEED_RANGE[1]:
        raise bad_request(f"'seed' + n - 1 must be at most {SEED_RANGE[1]} (choice i uses seed + i)", "seed")
    low, high = PENALTY_RANGE
    fields = {
        "n": n,
        "logprobs": logprobs,
        "presence_penalty": get_float(params, "presence_penalty", 0.0, low=low, high=high),
        "frequency_penalty": get_float(params, "frequency_penalty", 0.0, low=low, high=high),
        "repetition_penalty": get_float(
            params, "repetition_penalty", 1.0, low=0.0, high=MAX_REPETITION_PENALTY, open_low=True
        ),
        "logit_bias": get_logit_bias(params, limits.vocab_size),
    }
    return checked_sampling(lambda changes: replace(sampling, **changes), fields)


def _openai_logprobs(body: dict[str, Any], *, chat: bool) -> int | None:
    """Chat: ``logprobs: true`` and ``top_logprobs`` in [0, 20]; completions: ``logprobs`` in [0, 5]."""
    if not chat:
        logprobs = get_int(body, "logprobs", None, minimum=0)
        if logprobs is not None and logprobs > MAX_COMPLETION_LOGPROBS:
            raise bad_request(
                f"'logprobs' must be in [0, {MAX_COMPLETION_LOGPROBS}], got {logprobs}", "logprobs"
            )
        return logprobs
    top = get_int(body, "top_logprobs", None, minimum=0)
    if top is not None and top > MAX_TOP_LOGPROBS:
        raise bad_request(f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {top}", "top_logprobs")
    if not get_bool(body, "logprobs"):
        if top:
            raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return None
    return top or 0


def _sglang_logprobs(body: dict[str, Any]) -> int | None:
    """``return_logprob`` with ``top_logprobs_num``; output tokens only (``logprob_start_len`` -1,
    which SGLang, too, ignores without ``return_logprob``)."""
    top = get_int(body, "top_logprobs_num", 0, minimum=0) or 0
    if top > MAX_TOP_LOGPROBS:
        raise bad_request(
            f"'top_logprobs_num' must be in [0, {MAX_TOP_LOGPROBS}], got {top}", "top_logprobs_num"
        )
    start = get_int(body, "logprob_start_len", -1)
    if not get_bool(body, "return_logprob"):
        return None
    if start != -1:
        raise bad_request(
            "prompt logprobs are not supported: 'logprob_start_len' must be -1", "logprob_start_len"
        )
    return top


def get_logit_bias(params: dict[str, Any], vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias``: an object from token ids (decimal strings, in the vocabulary) to
    biases in [-100, 100], at most ``MAX_LOGIT_BIAS`` of them."""
    value, name = params.get("logit_bias"), "logit_bias"
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise bad_request(f"'{name}' must be an object mapping token ids to biases", name)
    if len(value) > MAX_LOGIT_BIAS:
        raise bad_request(f"'{name}' may hold at most {MAX_LOGIT_BIAS} entries", name)
    low, high = LOGIT_BIAS_RANGE
    out: dict[int, float] = {}
    for key, bias in value.items():
        if (
            not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 12)
            or int(key) >= vocab_size
        ):
            raise bad_request(
                f"'{name}' keys must be token ids in [0, {vocab_size}), got {show_value(key)}", name
            )
        if (
            isinstance(bias, bool)
            or not isinstance(bias, int | float)
            or not is_finite(bias)
            or not low <= bias <= high
        ):
            raise bad_request(
                f"'{name}' values must be numbers in [{low}, {high}], got {show_value(bias)}", name
            )
        if int(key) in out:
            raise bad_request(f"'{name}' names token {int(key)} twice", name)
        out[int(key)] = float(bias)
    return tuple(out.items())


def _top_k(body: dict[str, Any]) -> int:
    top_k = get_int(body, "top_k", -1)
    assert top_k is not None
    if top_k == 0 or top_k < -1:
        raise bad_request(f"'top_k' must be -1 (disabled) or >= 1, got {top_k}", "top_k")
    return top_k


def checked_sampling(build: Any, source: Any) -> SamplingParams:
    """``build(source)``, with ``SamplingParams``' own refusal (a ``ValueError``) as a 400."""
    try:
        return build(source)
    except ValueError as exc:  # SamplingParams' own checks, should a field slip past the ones above
        raise bad_request(str(exc)) from None
