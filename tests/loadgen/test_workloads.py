"""Workloads are token-exact for the real SmolLM2 tokenizer, have the promised prefix structure, and are
reproducible by seed."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from loadgen.prompts import PromptRenderer, RequestOptions
from loadgen.reuse import reusable_fraction
from loadgen.workloads import (
    LongDocQAConfig,
    MultiTurnConfig,
    RandomConfig,
    SharedPrefixConfig,
    build_long_doc_qa,
    build_multi_turn,
    build_random,
    build_shared_prefix,
)
from loadgen.workloads.shared_prefix import zipf_group_sizes

GSP = SharedPrefixConfig(
    num_groups=4, prompts_per_group=5, system_prompt_len=200, question_len=30, output_len=8
)


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def renderer(tokenizer, vocab, endpoint="completions", prompt_format="text"):
    options = RequestOptions(endpoint=endpoint, model="m", prompt_format=prompt_format)
    return PromptRenderer(tokenizer, vocab.separator_ids, options)


def test_vocabulary_round_trips(tokenizer, vocab):
    ids = list(vocab.sample(np.random.default_rng(0), 3000))
    assert tokenizer.encode(tokenizer.decode(ids)) == ids
    assert len(vocab.separator_ids) == 1


@pytest.mark.parametrize("prompt_format", ["text", "ids"])
def test_shared_prefix_is_token_exact_and_grouped(tokenizer, vocab, prompt_format):
    workload = build_shared_prefix(GSP, vocab)
    assert len(workload.conversations) == 20
    render = renderer(tokenizer, vocab, prompt_format=prompt_format)
    prompts = {}
    for conv in workload.conversations:
        (turn,) = conv.turns
        assert len(conv.system_ids) == 200 and len(turn.user_ids) == 30 and turn.output_len == 8
        rendered = render.render(conv, [], turn)
        ids = render.server_token_ids(rendered)
        # what the server tokenizes is exactly system + "\n\n" + question, 200 + 1 + 30 tokens
        assert ids == [*conv.system_ids, *vocab.separator_ids, *turn.user_ids]
        if prompt_format == "text":
            assert tokenizer.encode(orjson.loads(rendered.body)["prompt"]) == ids
        prompts[conv.conversation_id] = (conv.group, ids)
    items = list(prompts.values())
    for i, (group_a, a) in enumerate(items):
        for group_b, b in items[i + 1 :]:
            # same group: exactly the system prompt and separator; different groups: nothing
            assert common_prefix(a, b) == (201 if group_a == group_b else 0)


def test_shared_prefix_chat_contents_are_exact(tokenizer, vocab):
    workload = build_shared_prefix(GSP, vocab)
    render = renderer(tokenizer, vocab, endpoint="chat")
    conv = workload.conversations[0]
    rendered = render.render(conv, [], conv.turns[0])
    system, user = rendered.messages
    assert system["role"] == "system" and user["role"] == "user"
    assert tokenizer.encode(system["content"]) == list(conv.system_ids)
    assert tokenizer.encode(user["content"]) == list(conv.turns[0].user_ids)
    body = orjson.loads(rendered.body)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 8 and body["messages"] == rendered.messages
    # the template keeps the content's token boundaries: its ids appear verbatim in the prompt
    ids = render.server_token_ids(rendered)
    start = ids.index(conv.system_ids[0])
    assert ids[start : start + 200] == list(conv.system_ids)


def test_shared_prefix_reusable_fraction(tokenizer, vocab):
    workload = build_shared_prefix(GSP, vocab)
    render = renderer(tokenizer, vocab, prompt_format="ids")
    prompts = [render.server_token_ids(render.render(c, [], c.turns[0])) for c in workload.conversations]
    # token-level ideal cache: the first request of each group reuses nothing, the other 4 reuse 201
    assert reusable_fraction(prompts, block_size=1) == pytest.approx(4 * 4 * 201 / (20 * 231))
    assert reusable_fraction(prompts, block_size=16) == pytest.approx(4 * 4 * 192 / (20 * 231))


def test_seed_reproducibility(vocab):
    assert build_shared_prefix(GSP, vocab) == build_shared_prefix(GSP, vocab)
    other = build_shared_prefix(SharedPrefixConfig(**{**GSP.__dict__, "seed": 2}), vocab)
    assert other.conversations[0].system_ids != build_shared_prefix(GSP, vocab).conversations[0].system_ids
    mt = MultiTurnConfig(
        num_conversations=3, turns_per_conversation=3, system_prompt_len=20, user_turn_len=10
    )
    assert build_multi_turn(mt, vocab) == build_multi_turn(mt, vocab)
    assert build_random(RandomConfig(5, 50, 4), vocab) == build_random(RandomConfig(5, 50, 4), vocab)


def test_zipf_skew(vocab):
    sizes = zipf_group_sizes(np.random.default_rng(0), 16, 4000, 1.2)
    assert sizes.sum() == 4000 and sizes[0] > 4 * sizes[-1]
    workload = build_shared_prefix(SharedPrefixConfig(**{**GSP.__dict__, "zipf_alpha": 1.5}), vocab)
    groups = [c.group for c in workload.conversations]
    assert len(groups) == 20 and groups.count(0) > groups.count(3)


def test_multi_turn_history_session_and_exactness(tokenizer, vocab):
    config = MultiTurnConfig(
        num_conversations=3,
        turns_per_conversation=3,
        system_prompt_len=40,
        user_turn_len=12,
        think_time_s=0.5,
    )
    workload = build_multi_turn(config, vocab)
    assert workload.is_multi_turn and workload.num_requests == 9
    assert len({c.session_id for c in workload.conversations}) == 3
    conv = workload.conversations[0]
    assert conv.turns[0].think_time_s == 0 and all(t.think_time_s > 0 for t in conv.turns[1:])
    for turn in conv.turns:
        assert tokenizer.encode(tokenizer.decode(turn.user_ids)) == list(turn.user_ids)
    render = renderer(tokenizer, vocab, endpoint="chat")
    history = [(conv.turns[0], "Sure, here it is."), (conv.turns[1], "And more.")]
    rendered = render.render(conv, history, conv.turns[2])
    roles = [m["role"] for m in rendered.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert rendered.messages[2]["content"] == "Sure, here it is."
    body = orjson.loads(rendered.body)
    assert body["user"] == body["prompt_cache_key"] == conv.session_id
    assert rendered.headers["X-Session-ID"] == conv.session_id
    # the next turn's prompt extends the previous one: an ideal cache serves the history
    earlier = render.server_token_ids(render.render(conv, history[:1], conv.turns[1]))
    later = render.server_token_ids(rendered)
    assert later[: len(earlier)] == earlier


def test_long_doc_qa(tokenizer, vocab):
    config = LongDocQAConfig(num_documents=2, document_len=300, questions_per_document=4, question_len=10)
    workload = build_long_doc_qa(config, vocab)
    render = renderer(tokenizer, vocab)
    by_doc: dict[int, list[list[int]]] = {}
    for conv in workload.conversations:
        ids = render.server_token_ids(render.render(conv, [], conv.turns[0]))
        assert len(ids) == 311 and ids == list(conv.turns[0].user_ids)
        by_doc.setdefault(conv.group, []).append(ids)
    assert common_prefix(by_doc[0][0], by_doc[0][1]) == 301
    assert common_prefix(by_doc[0][0], by_doc[1][0]) == 0


def test_random_control_has_no_reuse(tokenizer, vocab):
    workload = build_random(RandomConfig(num_prompts=8, input_len=64, output_len=4), vocab)
    render = renderer(tokenizer, vocab)
    prompts = [render.server_token_ids(render.render(c, [], c.turns[0])) for c in workload.conversations]
    assert all(len(p) == 64 for p in prompts)
    assert reusable_fraction(prompts, block_size=1) == 0.0
