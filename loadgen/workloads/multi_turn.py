"""Multi-turn chat: each conversation's history grows by the user turn and the model's own reply.

Turns after the first are built at run time from the reply text (``runner.py``), so only the user
messages, output lengths and think times are fixed here. Think times are exponential with mean
``think_time_s`` (0: none). All conversations share one system prompt of ``system_prompt_len`` tokens
(0: none, so the chat template's default applies), as an app's conversations do; a session id per
conversation lets a gateway pin it to the worker holding its history.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from loadgen.workloads.base import Conversation, Turn, Workload
from loadgen.workloads.vocab import WordVocabulary


@dataclass(frozen=True)
class MultiTurnConfig:
    num_conversations: int = 32
    turns_per_conversation: int = 4
    system_prompt_len: int = 256
    user_turn_len: int = 64
    output_len: int = 64
    think_time_s: float = 1.0
    seed: int = 1


def build_multi_turn(config: MultiTurnConfig, vocab: WordVocabulary) -> Workload:
    rng = np.random.default_rng(config.seed)
    system_ids = vocab.sample(rng, config.system_prompt_len)
    first_turns = vocab.sample_distinct_starts(rng, config.num_conversations, config.user_turn_len)
    conversations = []
    for index, first in enumerate(first_turns):
        turns = [Turn(user_ids=first, output_len=config.output_len)]
        for _ in range(config.turns_per_conversation - 1):
            think = float(rng.exponential(config.think_time_s)) if config.think_time_s > 0 else 0.0
            turns.append(Turn(vocab.sample(rng, config.user_turn_len), config.output_len, think))
        conversations.append(
            Conversation(
                f"conv{index}",
                tuple(turns),
                system_ids=system_ids,
                session_id=f"loadgen-{config.seed}-conv{index}",
            )
        )
    return Workload("multi-turn", tuple(conversations), {"workload": "multi-turn", **asdict(config)})
