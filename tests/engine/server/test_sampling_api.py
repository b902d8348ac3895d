"""logprobs, n > 1, penalties and logit_bias over HTTP: the official ``openai`` client against the
worker, reply shapes (whole and streamed), and values against a reference computed from the model's
own logits (a plain forward pass in the test). Out-of-range values are in ``test_errors.py``."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
import torch
from openai import OpenAI

from cache.prompt.chat import chat_prompt_ids
from tests.engine.server.conftest import EngineServer
from tests.engine.test_sampling_engine import model_logits

pytestmark = pytest.mark.slow  # every test here talks to a worker serving the real model

MESSAGES = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def client(engine_server: EngineServer) -> OpenAI:
    return OpenAI(base_url=f"{engine_server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def greedy_reference(server: EngineServer, prompt: list[int], steps: int) -> list[tuple[int, torch.Tensor]]:
    """(token, raw log-probabilities it was drawn from) for ``steps`` greedy steps of the model."""
    server.wait_idle()
    ids, out = list(prompt), []
    for _ in range(steps):
        logprobs = model_logits(server.engine, ids)[-1].log_softmax(-1)
        token = int(logprobs.argmax())
        out.append((token, logprobs))
        ids.append(token)
    return out


def token_text(server: EngineServer, token: int) -> str:
    return server.engine.tokenizer.decode([token], skip_special_tokens=False)


def test_chat_logprobs_match_the_model(client: OpenAI, engine_server: EngineServer) -> None:
    resp = client.chat.completions.create(
        model=engine_server.model_id,
        messages=MESSAGES,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = resp.choices[0].logprobs.content
    prompt = chat_prompt_ids(engine_server.engine.tokenizer, MESSAGES)
    reference = greedy_reference(engine_server, prompt, len(content))
    assert resp.usage.completion_tokens == len(content) == 5
    assert "".join(e.token for e in content) == resp.choices[0].message.content
    for entry, (token, logprobs) in zip(content, reference, strict=True):
        assert entry.token == token_text(engine_server, token)
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(logprobs[token].item(), abs=1e-3)
        top = logprobs.topk(3)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the top one
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-3)
        assert [t.token for t in entry.top_logprobs] == [
            token_text(engine_server, int(i)) for i in top.indices
        ]


def test_completion_logprobs_whole_and_streamed(client: OpenAI, engine_server: EngineServer) -> None:
    ask: dict[str, Any] = dict(
        model=engine_server.model_id, prompt="The sky is", max_tokens=6, temperature=0, logprobs=2
    )
    whole = client.completions.create(**ask)
    lp = whole.choices[0].logprobs
    text = whole.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == logprob and 2 <= len(top) <= 3  # the top 2, and the sampled one
    prompt = engine_server.engine.tokenizer.encode("The sky is", add_special_tokens=True)
    reference = greedy_reference(engine_server, prompt, 6)
    assert lp.token_logprobs == pytest.approx([float(p[t]) for t, p in reference], abs=1e-3)
    streamed = list(client.completions.create(**ask, stream=True))
    blocks = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t for b in blocks for t in b.tokens] == lp.tokens
    assert [o for b in blocks for o in b.text_offset] == lp.text_offset
    assert [x for b in blocks for x in b.token_logprobs] == pytest.approx(lp.token_logprobs)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text


def test_n_choices_whole_and_streamed_equal_single_requests(
    client: OpenAI, engine_server: EngineServer
) -> None:
    ask: dict[str, Any] = dict(
        model=engine_server.model_id, messages=MESSAGES, max_tokens=8, temperature=1.0, seed=100
    )
    whole = client.chat.completions.create(**ask, n=3)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    singles = [client.chat.completions.create(**{**ask, "seed": 100 + i}) for i in range(3)]
    assert [c.message.content for c in whole.choices] == [s.choices[0].message.content for s in singles]
    assert whole.usage.prompt_tokens == singles[0].usage.prompt_tokens  # the prompt counts once
    assert whole.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    chunks = list(
        client.chat.completions.create(**ask, n=3, stream=True, stream_options={"include_usage": True})
    )
    roles = [c.choices[0].index for c in chunks[:3]]
    assert roles == [0, 1, 2] and all(c.choices[0].delta.role == "assistant" for c in chunks[:3])
    texts, finishes = ["", "", ""], [None, None, None]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [c.finish_reason for c in whole.choices]
    content = [c.choices[0].index for c in chunks[3:] if c.choices and c.choices[0].delta.content]
    assert content.index(1) < len(content) - 1 - content[::-1].index(0)  # interleaved as they come
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    engine_server.wait_idle()


def test_logit_bias_and_penalties_change_the_answer(client: OpenAI, engine_server: EngineServer) -> None:
    forced = engine_server.engine.tokenizer.encode(" blue")[0]
    resp = client.completions.create(
        model=engine_server.model_id,
        prompt="The sky is",
        max_tokens=4,
        temperature=0,
        logit_bias={str(forced): 100},
        logprobs=0,
    )
    assert resp.choices[0].text == " blue" * 4
    assert all(lp < 0 for lp in resp.choices[0].logprobs.token_logprobs)  # raw: the bias is not in them
    plain = client.completions.create(
        model=engine_server.model_id, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0
    )
    penalized = client.completions.create(
        model=engine_server.model_id,
        prompt="1, 2, 3, 4,",
        max_tokens=12,
        temperature=0,
        frequency_penalty=2.0,
    )
    assert plain.choices[0].text != penalized.choices[0].text
    assert penalized.choices[0].text.count(",") < plain.choices[0].text.count(",")


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with session.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_a_mixed_concurrent_batch_gives_each_request_its_own_answer(
    engine_server: EngineServer,
) -> None:
    """Plain, penalised, biased, logprobs and n > 1 requests at once: each answer equals the same
    request served alone."""
    base = {"model": engine_server.model_id, "max_tokens": 8, "temperature": 0}
    chat = f"{engine_server.url}/v1/chat/completions"
    bodies = [
        {**base, "messages": MESSAGES},
        {**base, "messages": MESSAGES, "presence_penalty": 1.5, "repetition_penalty": 1.4},
        {**base, "messages": MESSAGES, "logit_bias": {"28": 5}, "frequency_penalty": 1.0},
        {**base, "messages": MESSAGES, "logprobs": True, "top_logprobs": 2},
        {**base, "messages": MESSAGES, "n": 2, "temperature": 0.9, "seed": 5},
        {**base, "messages": [{"role": "user", "content": "Count to five."}]},
    ]

    def answers(reply: dict[str, Any]) -> list[str]:
        return [c["message"]["content"] for c in reply["choices"]]

    def logprobs(reply: dict[str, Any]) -> list[float]:  # equal to float rounding: batch shapes differ
        return [e["logprob"] for e in reply["choices"][0]["logprobs"]["content"]]

    async with aiohttp.ClientSession() as session:
        together = await asyncio.gather(*(post(session, chat, b) for b in bodies))
        alone = [await post(session, chat, b) for b in bodies]
    assert [answers(r) for r in together] == [answers(r) for r in alone]
    assert logprobs(together[3]) == pytest.approx(logprobs(alone[3]), abs=1e-4)
    assert len({answers(r)[0] for r in together[:3]}) == 3
    engine_server.wait_idle()


async def test_sglang_return_logprob(engine_server: EngineServer) -> None:
    body = {
        "text": "The sky is",
        "sampling_params": {"max_new_tokens": 4, "temperature": 0, "presence_penalty": 0.5},
        "return_logprob": True,
        "top_logprobs_num": 2,
        "return_text_in_logprobs": True,
    }
    async with aiohttp.ClientSession() as session:
        reply = await post(session, f"{engine_server.url}/generate", body)
        async with session.post(f"{engine_server.url}/generate", json={**body, "stream": True}) as resp:
            events = [
                json.loads(line[6:])
                for line in (await resp.text()).splitlines()
                if line.startswith("data: {")
            ]
    meta = reply["meta_info"]
    assert meta["input_token_logprobs"] == []
    assert [e[1] for e in meta["output_token_logprobs"]] == reply["output_ids"]
    assert all(len(top) == 2 and top[0][2] is not None for top in meta["output_top_logprobs"])
    prompt = engine_server.engine.tokenizer.encode("The sky is", add_special_tokens=True)
    reference = greedy_reference(engine_server, prompt, 1)
    assert meta["output_token_logprobs"][0][0] == pytest.approx(
        float(reference[0][1][reference[0][0]]), abs=1e-3
    )
    assert events[-1]["meta_info"]["output_token_logprobs"] == meta["output_token_logprobs"]  # cumulative
