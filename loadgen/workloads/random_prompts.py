"""Random prompts with no reuse: the control. First tokens are all distinct, so raw prompts share no
prefix; through the chat endpoint only the chat template's own preamble is shared."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from loadgen.workloads.base import Conversation, Turn, Workload
from loadgen.workloads.vocab import WordVocabulary


@dataclass(frozen=True)
class RandomConfig:
    num_prompts: int = 256
    input_len: int = 1024
    output_len: int = 128
    seed: int = 1


def build_random(config: RandomConfig, vocab: WordVocabulary) -> Workload:
    rng = np.random.default_rng(config.seed)
    prompts = vocab.sample_distinct_starts(rng, config.num_prompts, config.input_len)
    conversations = tuple(
        Conversation(f"r{i}", (Turn(user_ids=ids, output_len=config.output_len),))
        for i, ids in enumerate(prompts)
    )
    return Workload("random", conversations, {"workload": "random", **asdict(config)})
