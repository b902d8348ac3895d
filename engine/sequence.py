"""A request's state as the scheduler and runner see it: token ids, progress and pages."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cache.api.kv_fields import KVPin
from cache.api.sampling import SamplingParams
from engine.kv.prefix_cache import Node

if TYPE_CHECKING:
    from engine.sampling import TokenLogprobs


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"
    ERROR = "error"  # this request failed in the engine (``Sequence.error`` says why); others go on


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_total_tokens: int = 1 << 30  # context length: prompt + output never exceed it
    cache_salt: str = ""  # prefix-cache namespace: only requests with the same salt share pages
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    pages: list[int] = field(default_factory=list)  # KV pages in token order
    num_computed: int = 0  # leading tokens whose KV is in ``pages``
    num_cached_prompt: int = 0  # prompt tokens that came from the prefix cache (first admission)
    cache_node: Node | None = None  # locked prefix-cache node covering pages[:num_tree_pages]
    num_tree_pages: int = 0  # leading pages owned by the prefix cache
    admitted: bool = False  # set once: cached-token accounting is for the first admission only
    error: str | None = None  # why it failed, when finish_reason is ERROR
    # n > 1: choice 0 is scheduled; the other choices wait in its ``forks`` until its prompt's last
    # logits exist, then each samples its first token from them and shares its prompt's pages.
    choice: int = 0
    forks: list[Sequence] = field(default_factory=list)
    last_logprobs: TokenLogprobs | None = None  # of the newest output token, when the request asks
    kv_pins: tuple[KVPin, ...] = ()  # prefixes of the prompt to retain once it is prefilled (choice 0)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        """More than one token still lacks KV (after a preemption this includes output tokens)."""
        return self.num_tokens - self.num_computed > 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
