"""Generated shared prefix, after SGLang bench_serving's ``generated-shared-prefix`` dataset.

SGLang (``sample_generated_shared_prefix_requests``): ``num_groups`` random system prompts of
``system_prompt_len`` tokens, ``num_groups * prompts_per_group`` random questions of ``question_len``
tokens, prompt ``f"{system_prompt}\\n\\n{question}"``, fixed ``output_len``, all requests shuffled.
Defaults 64 / 16 / 2048 / 128 / 256 as there.

Differences, all deliberate: prompts are token-exact (system ids + the "\\n\\n" separator id + question
ids, so a raw prompt is ``system_prompt_len + 1 + question_len`` tokens); first tokens are distinct
across groups (groups share nothing) and across questions of a group (a group shares exactly the
system prompt and separator); and ``zipf_alpha > 0`` draws each request's group from a Zipf law
(group 0 hottest) instead of giving every group exactly ``prompts_per_group`` requests.
With the chat endpoint the system prompt is the system message and the question the user message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from loadgen.workloads.base import Conversation, Turn, Workload
from loadgen.workloads.vocab import WordVocabulary


@dataclass(frozen=True)
class SharedPrefixConfig:
    num_groups: int = 64
    prompts_per_group: int = 16
    system_prompt_len: int = 2048
    question_len: int = 128
    output_len: int = 256
    zipf_alpha: float = 0.0
    seed: int = 1


def zipf_group_sizes(rng: np.random.Generator, num_groups: int, total: int, alpha: float) -> np.ndarray:
    """How many of ``total`` requests each group gets: P(group g) ∝ 1 / (g + 1) ** alpha."""
    weights = 1.0 / np.arange(1, num_groups + 1, dtype=np.float64) ** alpha
    groups = rng.choice(num_groups, size=total, p=weights / weights.sum())
    return np.bincount(groups, minlength=num_groups)


def build_shared_prefix(config: SharedPrefixConfig, vocab: WordVocabulary) -> Workload:
    rng = np.random.default_rng(config.seed)
    total = config.num_groups * config.prompts_per_group
    system_prompts = vocab.sample_distinct_starts(rng, config.num_groups, config.system_prompt_len)
    if config.zipf_alpha > 0:
        sizes = zipf_group_sizes(rng, config.num_groups, total, config.zipf_alpha)
    else:
        sizes = np.full(config.num_groups, config.prompts_per_group)
    conversations = []
    for group, size in enumerate(sizes):
        questions = vocab.sample_distinct_starts(rng, int(size), config.question_len)
        for index, question in enumerate(questions):
            turn = Turn(user_ids=question, output_len=config.output_len)
            conversations.append(
                Conversation(f"g{group}-q{index}", (turn,), system_ids=system_prompts[group], group=group)
            )
    order = rng.permutation(len(conversations))
    return Workload(
        "shared-prefix",
        tuple(conversations[i] for i in order),
        {"workload": "shared-prefix", **asdict(config)},
    )
