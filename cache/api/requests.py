"""Request bodies -> validated generation requests: the one parser the gateway and the engine share.

``parse_request(kind, body, tokenizer, limits)`` turns an OpenAI chat or completions body, or an
SGLang ``/generate`` body, into prompt token ids and sampling parameters. The gateway hashes the ids
it returns and the engine computes them, so both tokenize alike by construction: there is no second
path from a body to token ids. Every rejection is an ``ApiError`` (400) naming the field.

Unknown fields are ignored, as OpenAI-compatible servers do. Known fields that the embedded engine
cannot honour (best_of, echo, min_p, min_tokens, prompt logprobs, response formats, forced tool calls)
are rejected when ``limits.engine_features`` is set, rather than silently dropped; the gateway leaves
them to whichever upstream it forwards to. So are the fields only the engine reads (``n``, logprobs,
penalties, ``logit_bias``: ``engine_sampling``), whose ranges an upstream may draw differently.

Hostile input: every value that reaches the sampler is in a range where its math is sound (see
``cache.api.sampling``), lists and strings that cost work per generated token are bounded (stop
strings, stop token ids), and a body that is not valid JSON, nests too deeply for the parser, or holds
a string that is not valid Unicode is a 400, never a 500.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from typing import Any, Literal

from aiohttp import web

from cache.api.errors import ApiError, bad_request
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
from cache.api.tools import ToolRequest, get_tools
from cache.prompt import chat
from cache.prompt.tokenizer import Tokenizer

Kind = Literal["chat", "completions", "generate"]
DEFAULT_MAX_TOKENS = 256  # OpenAI's default is "up to the context"; a bound keeps a bare request cheap
SGLANG_DEFAULT_MAX_NEW_TOKENS = 128
# Bounds on what costs work per generated token or memory per distinct value (vLLM leaves these
# unbounded; OpenAI allows 4 stop strings).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024  # per stop string: the stream holds back up to this much text
MAX_STOP_TOKEN_IDS = 256
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound for the completions route's ``logprobs``
MAX_CACHE_SALT_CHARS = 256  # the engine keeps a prefix-cache root per salt while it caches pages
MAX_RID_CHARS = 256
MAX_FETCH_PLAN_BLOCKS = 8192  # a fetch plan names at most this many blocks (128k tokens of 16-token pages)
MAX_FETCH_ENDPOINT_CHARS = 512
MAX_KV_PINS = 4  # Anthropic's bound on cache_control breakpoints
MAX_KV_PIN_TTL_S = 7 * 86400.0
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # JSON escapes of UTF-16 surrogates


@dataclass(frozen=True)
class ServingLimits:
    """What the serving side can take. The engine knows all of it; the gateway knows the vocabulary."""

    vocab_size: int
    max_model_len: int | None = None  # prompt tokens must stay below it; None: unchecked
    engine_features: bool = False  # reject what the embedded engine does not implement


@dataclass(frozen=True)
class GenerationRequest:
    """What one API call asks for, whichever API it came through."""

    kind: Kind
    prompt_ids: list[int]
    sampling: SamplingParams
    stream: bool = False
    include_usage: bool = False  # OpenAI ``stream_options.include_usage``
    cache_salt: str = ""  # vLLM's field: requests share cached prefixes only with the same salt
    model: str | None = None
    rid: str | None = None  # SGLang's request id (``/generate``)
    prompt_param: str = "prompt"  # the field errors about the prompt name
    kv_fetch_plan: FetchPlan | None = None  # the gateway's plan: pull this prefix from a peer first
    # Prefill/decode disaggregation (vLLM's ``kv_transfer_params.do_remote_decode``): this engine is the
    # prefill side; its answer says where the decode side pulls the prompt's KV from.
    remote_decode: bool = False
    tool_parser: str | None = None  # chat with tools: the ``cache.prompt.tool_calls`` parser for the answer
    kv_pins: tuple[KVPin, ...] = ()  # the gateway's ``kv_pin``: prefixes to retain once prefilled


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


def parse_request(
    kind: Kind, body: dict[str, Any], tokenizer: Tokenizer, limits: ServingLimits
) -> GenerationRequest:
    """Validate ``body`` and tokenize its prompt exactly as the engine serves it."""
    model = body.get("model")
    if model is not None and not isinstance(model, str) and kind != "generate":
        raise bad_request("'model' must be a string", "model")
    stream = get_bool(body, "stream")
    tools = ToolRequest()  # chat only
    if kind == "generate":
        prompt_ids, param = _generate_prompt_ids(tokenizer, body)
        sampling = _sampling(sampling_from_sglang, body.get("sampling_params"))
        include_usage = False
        rid = body.get("rid")
        if rid is not None and (not isinstance(rid, str) or len(rid) > MAX_RID_CHARS):
            raise bad_request(f"'rid' must be a string of at most {MAX_RID_CHARS} characters", "rid")
        if limits.engine_features:
            if get_bool(body, "return_hidden_states"):
                raise bad_request(
                    "'return_hidden_states' is not supported by this engine", "return_hidden_states"
                )
            reject_unsupported_sampling(body.get("sampling_params") or {})
            sampling = engine_sampling(kind, body, sampling, limits)
    else:
        if limits.engine_features:
            reject_unsupported(body, chat=kind == "chat")
        if kind == "chat":
            tools = get_tools(body, tokenizer, limits.engine_features)
            prompt_ids, param = chat_prompt_ids(tokenizer, body.get("messages"), tools.tools), "messages"
        elif "prompt" not in body:
            raise bad_request("'prompt' is required", "prompt")
        else:
            prompt_ids, param = completion_prompt_ids(tokenizer, body["prompt"]), "prompt"
        sampling = _sampling(sampling_from_openai, body)
        if limits.engine_features:
            sampling = engine_sampling(kind, body, sampling, limits)
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object", "stream_options")
        include_usage = stream and get_bool(options or {}, "include_usage")
        rid = None
    check_prompt(prompt_ids, limits, param)
    check_context(prompt_ids, body if kind != "generate" else body.get("sampling_params") or {}, limits)
    model = model if isinstance(model, str) else None
    return GenerationRequest(
        kind,
        prompt_ids,
        sampling,
        stream,
        include_usage,
        get_cache_salt(body),
        model,
        rid,
        param,
        *get_kv_transfer(body),
        tool_parser=tools.parser,
        kv_pins=get_kv_pins(body),
    )


def _sampling(build: Any, source: Any) -> SamplingParams:
    try:
        return build(source)
    except ValueError as exc:  # SamplingParams' own checks, should a field slip past the ones above
        raise bad_request(str(exc)) from None


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


# -- prompts --------------------------------------------------------------------------------------
def chat_prompt_ids(tokenizer: Tokenizer, messages: Any, tools: list[Any] | None = None) -> list[int]:
    """The chat template rendered with ``tools`` and tokenized (``cache.prompt.chat``), its errors as 400s."""
    try:
        return chat.chat_prompt_ids(tokenizer, messages, tools)
    except chat.InvalidMessages as exc:
        raise bad_request(str(exc), exc.param) from None


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


def _generate_prompt_ids(tokenizer: Tokenizer, body: dict[str, Any]) -> tuple[list[int], str]:
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise bad_request("give exactly one of 'text' and 'input_ids'", "text")
    if isinstance(text, list) or (
        isinstance(input_ids, list) and input_ids and isinstance(input_ids[0], list)
    ):
        raise bad_request("batched /generate is not supported; send one request per prompt", "text")
    if text is not None:
        return completion_prompt_ids(tokenizer, text, "text"), "text"
    return get_token_ids(input_ids, "input_ids"), "input_ids"


def check_context(prompt_ids: list[int], source: dict[str, Any], limits: ServingLimits) -> None:
    """An explicit output budget must fit the context after the prompt (as vLLM and SGLang check);
    the defaults are not checked, the engine stops at the context instead (finish reason "length")."""
    if limits.max_model_len is None:
        return
    fields = ("max_completion_tokens", "max_tokens", "max_new_tokens")  # the first one given sets the budget
    name = next((n for n in fields if source.get(n) is not None), "")
    requested = source.get(name)
    if isinstance(requested, int) and len(prompt_ids) + requested > limits.max_model_len:
        raise ApiError(
            400,
            f"this model's context is {limits.max_model_len} tokens; the prompt has {len(prompt_ids)} "
            f"and '{name}' asks for {_show(requested)} more",
            param=name,
            code="context_length_exceeded",
        )


def check_prompt(prompt_ids: list[int], limits: ServingLimits, param: str) -> None:
    if not prompt_ids:
        raise bad_request("the prompt is empty", param)
    if limits.max_model_len is not None and len(prompt_ids) >= limits.max_model_len:
        raise ApiError(
            400,
            f"the prompt has {len(prompt_ids)} tokens; this model's context is {limits.max_model_len} tokens",
            param=param,
            code="context_length_exceeded",
        )
    if min(prompt_ids) < 0 or max(prompt_ids) >= limits.vocab_size:
        raise bad_request(f"token ids must be in [0, {limits.vocab_size})", param)


# -- sampling -------------------------------------------------------------------------------------
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
    return _sampling(lambda changes: replace(sampling, **changes), fields)


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
            raise bad_request(f"'{name}' keys must be token ids in [0, {vocab_size}), got {_show(key)}", name)
        if (
            isinstance(bias, bool)
            or not isinstance(bias, int | float)
            or not _finite(bias)
            or not low <= bias <= high
        ):
            raise bad_request(f"'{name}' values must be numbers in [{low}, {high}], got {_show(bias)}", name)
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


# -- typed field access ---------------------------------------------------------------------------
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


def _show(value: Any) -> str:
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
        raise bad_request(f"'{name}' must be an integer, got {_show(value)}", name)
    if minimum is not None and value < minimum:
        raise bad_request(f"'{name}' must be at least {minimum}, got {_show(value)}", name)
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
    if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
        raise bad_request(f"'{name}' must be a finite number, got {_show(value)}", name)
    if value < low or value > high or (open_low and value == low):
        interval = f"{'(' if open_low else '['}{low}, {high}]"
        raise bad_request(f"'{name}' must be in {interval}, got {_show(value)}", name)
    return float(value)


def _finite(value: int | float) -> bool:
    return abs(value) < 2**1000 if isinstance(value, int) else math.isfinite(value)  # no OverflowError


def get_bool(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be a boolean, got {_show(value)}", name)
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
