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

This module holds the request as a whole: its kinds, ``ServingLimits``, ``GenerationRequest``, the
prompt (ids, emptiness, vocabulary, context) and ``parse_request``, which assembles the rest. The
fields it reads live by concept: ``cache.api.fields`` the body and its typed getters,
``cache.api.sampling_fields`` sampling (``engine_sampling``, ``reject_unsupported``),
``cache.api.kv_fields`` the KV cache (``cache_salt``, fetch plans, KV transfer, retention pins),
``cache.api.tools`` tools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from cache.api.errors import ApiError, bad_request
from cache.api.fields import MAX_RID_CHARS, get_bool, get_token_ids, show_value
from cache.api.kv_fields import FetchPlan, KVPin, get_cache_salt, get_kv_pins, get_kv_transfer
from cache.api.sampling import SamplingParams
from cache.api.sampling_fields import (
    checked_sampling,
    engine_sampling,
    reject_unsupported,
    reject_unsupported_sampling,
    sampling_from_openai,
    sampling_from_sglang,
)
from cache.api.tools import ToolRequest, get_tools
from cache.prompt import chat
from cache.prompt.tokenizer import Tokenizer

Kind = Literal["chat", "completions", "generate"]


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
        sampling = checked_sampling(sampling_from_sglang, body.get("sampling_params"))
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
        sampling = checked_sampling(sampling_from_openai, body)
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
            f"and '{name}' asks for {show_value(requested)} more",
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
