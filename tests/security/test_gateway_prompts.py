"""Oversized prompts and floods of session keys: the gateway refuses what cannot fit before tokenizing
it, tokenizes off the event loop, claims index blocks only for requests a worker accepted, and keeps
its session pins bounded. Stub workers on loopback; no model."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import orjson

from cache.index.ops import StoredOp
from cache.prompt.tokenizer import Tokenizer
from cache.wire.hashing import block_hashes, namespace_seed
from gateway.shared_state import LocalSharedState
from tests.security.gateway_support import (
    BODY,
    CHAT,
    HostileWorker,
    gateway_over,
    shared_tokenizer,  # noqa: F401  (the ``tokenizer`` fixture)
)

CONTEXT = 8192
GATE_CHARS = 50_000  # texts this long wait at the gate while being tokenized


@dataclasses.dataclass(frozen=True)
class GatedTokenizer(Tokenizer):
    """Tokenizes long texts only once the test opens the gate, and records every length it was given."""

    entered: threading.Event = dataclasses.field(default_factory=threading.Event)
    gate: threading.Event = dataclasses.field(default_factory=threading.Event)
    lengths: list[int] = dataclasses.field(default_factory=list)

    def _wait(self, text: str) -> None:
        self.lengths.append(len(text))
        if len(text) >= GATE_CHARS:
            self.entered.set()
            self.gate.wait(timeout=60)  # only a guard: the test opens it

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self._wait(text)
        return super().encode(text, add_special_tokens)

    def encode_text(self, text: str) -> list[int]:
        self._wait(text)
        return super().encode_text(text)


def chat(text: str) -> dict:
    return {**BODY, "messages": [{"role": "user", "content": text}]}


async def test_oversized_prompts_are_refused_without_stalling_other_requests(tokenizer: Tokenizer) -> None:
    gated = GatedTokenizer(
        tokenizer.backend, tokenizer.bos_token_id, tokenizer.eos_token_ids, tokenizer.chat_template
    )
    async with gateway_over(gated, HostileWorker("ok", context_length=CONTEXT)) as g:
        # 8 MB of text: refused by its size alone, never tokenized.
        huge = orjson.dumps(chat("hello world " * 650_000))
        async with g.session.post(
            g.base + CHAT, data=huge, headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "context_length_exceeded"
        assert max(gated.lengths, default=0) < GATE_CHARS
        # Long enough to need tokenizing, too long to fit: while its tokenizer thread waits at the gate,
        # another request goes all the way through (an event loop blocked by tokenizing could not).
        long = asyncio.create_task(g.session.post(g.base + CHAT, json=chat("hello world " * 20_000)))
        await asyncio.get_running_loop().run_in_executor(None, gated.entered.wait, 60)
        async with g.session.post(g.base + CHAT, json=BODY) as r:
            assert r.status == 200
        assert not long.done()
        gated.gate.set()
        async with await long as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "context_length_exceeded"
        assert len(g.stubs[0].bodies) == 1  # neither oversized prompt reached the worker


async def test_rejected_prompts_do_not_claim_index_blocks(tokenizer: Tokenizer) -> None:
    """Claims happen once a worker accepts: prompts it refuses (or the gateway refuses) evict nothing."""
    async with gateway_over(tokenizer, HostileWorker("reject_400", context_length=CONTEXT)) as g:
        worker = next(iter(g.state.pool))
        real = block_hashes(list(range(64)), worker.page_size, seed=namespace_seed("stub-model", ""))
        await g.state.store.append(StoredOp(worker.worker_id, None, real))
        before, held = g.state.store.index.stats(), g.state.store.match(real)
        for i in range(3):
            async with g.session.post(
                g.base + CHAT, json=chat(f"{i} " + "the worker refuses me " * 300)
            ) as r:
                assert r.status == 400  # the worker's refusal, relayed
            async with g.session.post(g.base + CHAT, json=chat("x " * 40_000)) as r:
                assert r.status == 400  # the gateway's: longer than the context
        after = g.state.store.index.stats()
        assert (after.blocks, after.approx_entries) == (before.blocks, before.approx_entries)
        assert g.state.store.match(real) == held and held


async def test_session_keys_of_any_size_are_pinned_as_fixed_size_digests(tokenizer: Tokenizer) -> None:
    async with gateway_over(tokenizer, HostileWorker("ok")) as g:
        for i in range(3):
            body = {**BODY, "prompt_cache_key": f"{i}" + "k" * 2**20}  # 1 MB keys
            async with g.session.post(g.base + CHAT, json=body) as r:
                assert r.status == 200
        pins = g.state.shared._pins  # type: ignore[attr-defined]
        assert len(pins) == 3 and all(len(key) == 64 for key in pins)


async def test_the_pin_map_stays_bounded_under_a_flood_of_distinct_keys() -> None:
    shared = LocalSharedState(max_pins=1000)
    for i in range(5000):
        await shared.pin_session(f"s{i}", "w", ttl_s=1800)
    assert shared.pin_count() == 1000
    assert await shared.pinned_worker("s4999") == "w" and await shared.pinned_worker("s0") is None
