"""Workloads: token-exact, seeded prompt sets built before timing starts."""

from loadgen.workloads.base import Conversation, Turn, Workload
from loadgen.workloads.long_doc_qa import LongDocQAConfig, build_long_doc_qa
from loadgen.workloads.multi_turn import MultiTurnConfig, build_multi_turn
from loadgen.workloads.random_prompts import RandomConfig, build_random
from loadgen.workloads.shared_prefix import SharedPrefixConfig, build_shared_prefix
from loadgen.workloads.vocab import WordVocabulary

WORKLOAD_NAMES = ("shared-prefix", "multi-turn", "long-doc-qa", "random")

__all__ = [
    "WORKLOAD_NAMES",
    "Conversation",
    "LongDocQAConfig",
    "MultiTurnConfig",
    "RandomConfig",
    "SharedPrefixConfig",
    "Turn",
    "WordVocabulary",
    "Workload",
    "build_long_doc_qa",
    "build_multi_turn",
    "build_random",
    "build_shared_prefix",
]
