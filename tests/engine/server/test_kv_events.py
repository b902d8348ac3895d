"""A ZMQ subscriber rebuilds, from the published KV events alone, exactly the blocks the engine holds."""

from __future__ import annotations

import time
import uuid

import aiohttp
import pytest
import zmq
import zmq.asyncio

from cache.wire.events import AllBlocksCleared, BlockRemoved, BlockStored, decode_event_batch
from cache.wire.hashing import prompt_block_hashes
from tests.engine.server.conftest import EngineServer

pytestmark = pytest.mark.slow  # every test here talks to a worker serving the real model


class Mirror:
    """The subscriber's view: block hashes stored and not yet removed."""

    def __init__(self, endpoint: str) -> None:
        self.socket = zmq.asyncio.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.connect(endpoint)
        self.blocks: set[int] = set()
        self.last_seq: int | None = None
        self.cleared = self.removed = 0

    async def drain(self, timeout: float) -> None:
        while await self.socket.poll(int(timeout * 1000)):
            topic, seq, payload = await self.socket.recv_multipart()
            seq_no = int.from_bytes(seq, "big")
            assert topic == b"" and len(seq) == 8
            assert self.last_seq is None or seq_no == self.last_seq + 1, "a batch went missing"
            self.last_seq = seq_no
            for event in decode_event_batch(payload).events:
                if isinstance(event, BlockStored):
                    assert event.block_size == 16 and event.token_ids == []  # prompts stay private
                    self.blocks.update(event.block_hashes)
                elif isinstance(event, BlockRemoved):
                    self.removed += 1
                    self.blocks.difference_update(event.block_hashes)
                elif isinstance(event, AllBlocksCleared):
                    self.cleared += 1
                    self.blocks.clear()
            timeout = 0.05

    async def converge(self, server: EngineServer) -> set[int]:
        """Wait for the events of finished work, then return the engine's truth (it must match)."""
        server.wait_idle()
        truth = server.cached_block_hashes()
        deadline = time.monotonic() + 10
        while self.blocks != truth and time.monotonic() < deadline:
            await self.drain(0.2)
        return truth


async def post(session: aiohttp.ClientSession, url: str, body: dict) -> dict:
    async with session.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_subscriber_mirrors_the_prefix_cache(engine_server: EngineServer) -> None:
    mirror = Mirror(engine_server.publisher.endpoint)
    url = engine_server.url
    async with aiohttp.ClientSession() as session:
        # ZMQ subscriptions take a moment: flush until our AllBlocksCleared arrives, then start clean
        for _ in range(50):
            engine_server.wait_idle()
            async with session.post(url + "/flush_cache") as resp:
                assert resp.status == 200
            await mirror.drain(0.2)
            if mirror.cleared:
                break
        assert mirror.cleared and mirror.blocks == set() == engine_server.cached_block_hashes()

        # two chats sharing a system prompt: stored blocks carry the gateway's hashes
        system = f"[{uuid.uuid4().hex}] " + "You answer questions about trains. " * 12
        prompts = []
        for question in ("What is a bogie?", "What is a pantograph?"):
            messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            await post(
                session,
                url + "/v1/chat/completions",
                {"messages": messages, "max_tokens": 3, "temperature": 0},
            )
            tok = engine_server.engine.tokenizer
            prompts.append(tok.encode(tok.apply_chat_template(messages), add_special_tokens=False))
        truth = await mirror.converge(engine_server)
        assert mirror.blocks == truth and truth
        for prompt in prompts:  # every full page of each prompt is named as cache.wire.hashing names it
            assert set(prompt_block_hashes(prompt, engine_server.model_id)) <= mirror.blocks

        # distinct long prompts overflow the 64-page pool: LRU eviction publishes BlockRemoved
        removed_before = mirror.removed
        for i in range(3):
            ids = [1000 + 7 * i + (j * 13) % 500 for j in range(400)]
            await post(
                session, url + "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 1}}
            )
        truth = await mirror.converge(engine_server)
        assert mirror.removed > removed_before
        assert mirror.blocks == truth and truth

        # flush: BlockRemoved for everything, then AllBlocksCleared
        cleared_before = mirror.cleared
        async with session.post(url + "/flush_cache") as resp:
            assert resp.status == 200
        truth = await mirror.converge(engine_server)
        assert mirror.cleared == cleared_before + 1
        assert mirror.blocks == truth == set()
    mirror.socket.close()
