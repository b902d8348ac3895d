"""Long-document QA: a few long documents, many short questions about them, interleaved at random.

Each request's user message is ``document + "\\n\\n" + question`` (token-exact: ``document_len + 1 +
question_len`` content tokens), so requests about one document share its ``document_len + 1`` tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from loadgen.workloads.base import Conversation, Turn, Workload
from loadgen.workloads.vocab import WordVocabulary


@dataclass(frozen=True)
class LongDocQAConfig:
    num_documents: int = 4
    document_len: int = 4096
    questions_per_document: int = 32
    question_len: int = 32
    output_len: int = 64
    seed: int = 1


def build_long_doc_qa(config: LongDocQAConfig, vocab: WordVocabulary) -> Workload:
    rng = np.random.default_rng(config.seed)
    documents = vocab.sample_distinct_starts(rng, config.num_documents, config.document_len)
    conversations = []
    for doc_index, document in enumerate(documents):
        questions = vocab.sample_distinct_starts(rng, config.questions_per_document, config.question_len)
        for q_index, question in enumerate(questions):
            user_ids = (*document, *vocab.separator_ids, *question)
            turn = Turn(user_ids=user_ids, output_len=config.output_len)
            conversations.append(Conversation(f"doc{doc_index}-q{q_index}", (turn,), group=doc_index))
    order = rng.permutation(len(conversations))
    return Workload(
        "long-doc-qa", tuple(conversations[i] for i in order), {"workload": "long-doc-qa", **asdict(config)}
    )
