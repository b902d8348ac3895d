"""What every workload produces: conversations of token-exact turns, in arrival order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Turn:
    """One request of a conversation.

    ``user_ids`` are the exact token ids of the user message (or of the raw prompt's new part): their
    decoded text re-encodes to the same ids. ``think_time_s`` is the pause after the previous turn's
    reply before this turn is sent (0 for a conversation's first turn).
    """

    user_ids: tuple[int, ...]
    output_len: int
    think_time_s: float = 0.0


@dataclass(frozen=True)
class Conversation:
    """A sequence of turns sent one after another; single-shot workloads have one turn each.

    ``system_ids`` is the system prompt (empty: none). ``session_id`` is sent as ``X-Session-ID``,
    ``user`` and ``prompt_cache_key`` so a gateway can pin the conversation. ``group`` names the
    shared prefix (shared-prefix group, document index) for reports; None when there is none.
    """

    conversation_id: str
    turns: tuple[Turn, ...]
    system_ids: tuple[int, ...] = ()
    session_id: str | None = None
    group: int | None = None


@dataclass(frozen=True)
class Workload:
    """Conversations in arrival order, built before timing starts, reproducible from ``params``."""

    name: str
    conversations: tuple[Conversation, ...]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)

    @property
    def is_multi_turn(self) -> bool:
        return any(len(c.turns) > 1 for c in self.conversations)
