"""cache_salt (vLLM's field, the gateway's per-tenant salt): prefixes are shared only within a salt."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid

import pytest
from openai import OpenAI

from cache.api.requests import chat_prompt_ids
from cache.wire.hashing import block_hashes, namespace_seed
from tests.engine.server.conftest import EngineServer

pytestmark = pytest.mark.slow  # every test here talks to a worker serving the real model


def test_salted_requests_share_prefixes_only_within_their_salt(engine_server: EngineServer) -> None:
    client = OpenAI(base_url=f"{engine_server.url}/v1", api_key="unused", max_retries=0)
    messages = [
        {"role": "system", "content": f"Tenant notes {uuid.uuid4().hex}. " + "Be brief. " * 40},
        {"role": "user", "content": "Hi"},
    ]

    def cached(salt: str) -> int:
        reply = client.chat.completions.create(
            model=engine_server.model_id, messages=messages, max_tokens=1, extra_body={"cache_salt": salt}
        )
        return reply.usage.prompt_tokens_details.cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-b") == 0  # same prompt, other tenant: nothing shared
    assert cached("tenant-a") > 0
    engine_server.wait_idle()
    # the engine names tenant A's pages exactly as the gateway hashes tenant A's prompt
    ids = chat_prompt_ids(engine_server.engine.tokenizer, messages)
    seed = namespace_seed(engine_server.model_id, "tenant-a")
    expected = block_hashes(ids, engine_server.engine.info.page_size, seed=seed)
    assert set(expected[:-1]) <= engine_server.cached_block_hashes()
    other = block_hashes(
        ids, engine_server.engine.info.page_size, seed=namespace_seed(engine_server.model_id)
    )
    assert not set(other) & engine_server.cached_block_hashes()  # nothing under the unsalted name


def test_bad_cache_salt_is_a_400(engine_server: EngineServer) -> None:
    body = json.dumps({"prompt": "x", "cache_salt": 5, "max_tokens": 1}).encode()
    request = urllib.request.Request(f"{engine_server.url}/v1/completions", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=30)
    assert error.value.code == 400
    assert json.loads(error.value.read())["error"]["param"] == "cache_salt"
