"""The OpenAI endpoints driven by the official ``openai`` client, plus prefix-cache accounting."""

from __future__ import annotations

import uuid

import pytest
from openai import OpenAI

from tests.engine.server.conftest import EngineServer

pytestmark = pytest.mark.slow  # every test here talks to a worker serving the real model


@pytest.fixture(scope="module")
def client(engine_server: EngineServer) -> OpenAI:
    return OpenAI(base_url=f"{engine_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_served_model(client: OpenAI, engine_server: EngineServer) -> None:
    assert [m.id for m in client.models.list().data] == [engine_server.model_id]


def test_chat_completion(client: OpenAI, engine_server: EngineServer) -> None:
    resp = client.chat.completions.create(
        model=engine_server.model_id,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=6,
        temperature=0,
    )
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and resp.model == engine_server.model_id
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = resp.usage
    assert 0 < usage.completion_tokens <= 6
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_stream_with_usage(client: OpenAI, engine_server: EngineServer) -> None:
    messages = [{"role": "user", "content": "Name a color."}]
    stream = client.chat.completions.create(
        model=engine_server.model_id,
        messages=messages,
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["stop"], ["length"])
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and chunks[-1].choices == []
    assert 0 < usage_chunks[0].usage.completion_tokens <= 5
    # the same request without streaming gives the same greedy text
    whole = client.chat.completions.create(
        model=engine_server.model_id, messages=messages, max_tokens=5, temperature=0
    )
    assert whole.choices[0].message.content == text


def test_completion(client: OpenAI, engine_server: EngineServer) -> None:
    resp = client.completions.create(
        model=engine_server.model_id, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert resp.object == "text_completion"
    assert resp.choices[0].text and resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 0 and 0 < resp.usage.completion_tokens <= 4


def test_completion_stream_matches_non_stream(client: OpenAI, engine_server: EngineServer) -> None:
    kwargs = dict(model=engine_server.model_id, prompt="One, two, three,", max_tokens=6, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_with_token_ids_and_max_completion_tokens(
    client: OpenAI, engine_server: EngineServer
) -> None:
    ids = engine_server.engine.tokenizer.encode("Hello, my name is")
    resp = client.completions.create(model=engine_server.model_id, prompt=ids, max_tokens=3, temperature=0)
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == 3
    chat = client.chat.completions.create(
        model=engine_server.model_id,
        messages=[{"role": "user", "content": "Count to ten."}],
        max_completion_tokens=2,
        temperature=0,
    )
    assert chat.usage.completion_tokens == 2 and chat.choices[0].finish_reason == "length"


def test_stop_string_ends_the_text(client: OpenAI, engine_server: EngineServer) -> None:
    kwargs = dict(model=engine_server.model_id, prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0)
    free = client.completions.create(**kwargs).choices[0].text
    assert len(free) > 4
    stop = free[2:4]
    stopped = client.completions.create(**kwargs, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free[: free.index(stop)]


def test_seed_makes_sampling_reproducible(client: OpenAI, engine_server: EngineServer) -> None:
    kwargs = dict(
        model=engine_server.model_id, prompt="Once upon a time", max_tokens=8, temperature=1.0, top_p=0.95
    )
    first = client.completions.create(**kwargs, seed=1234).choices[0].text
    assert client.completions.create(**kwargs, seed=1234).choices[0].text == first


def test_shared_system_prompt_is_served_from_the_cache(client: OpenAI, engine_server: EngineServer) -> None:
    """The second request reports cached_tokens equal to the page-aligned prefix the tree holds."""
    nonce = uuid.uuid4().hex  # first in the system prompt: no other test shares even its first page
    system = f"[{nonce}] You are a terse assistant for a bakery. " + "Answer in one short sentence. " * 20
    tokenizer, page = engine_server.engine.tokenizer, engine_server.engine.info.page_size

    def ask(question: str):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        prompt = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
        resp = client.chat.completions.create(
            model=engine_server.model_id, messages=messages, max_tokens=2, temperature=0
        )
        return prompt, resp.usage

    first_prompt, first = ask("When do you open?")
    assert first.prompt_tokens == len(first_prompt) > 150
    assert first.prompt_tokens_details.cached_tokens == 0
    engine_server.wait_idle()
    second_prompt = tokenizer.encode(
        tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": "Do you sell rye bread?"}]
        ),
        add_special_tokens=False,
    )
    in_tree = engine_server.cached_prefix_tokens(second_prompt)  # what the engine can reuse
    common = next(i for i, (a, b) in enumerate(zip(first_prompt, second_prompt, strict=False)) if a != b)
    assert in_tree == common // page * page  # the whole shared prefix, in whole pages

    _, second = ask("Do you sell rye bread?")
    assert second.prompt_tokens == len(second_prompt)
    assert second.prompt_tokens_details.cached_tokens == in_tree > 0
