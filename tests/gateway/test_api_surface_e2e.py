"""The Responses and Messages APIs against real engine workers, through the official SDKs: the second
call of a conversation reads its prefix from the worker's cache, and the usage says so."""

from __future__ import annotations

import anthropic
import openai
import pytest

from tests.gateway.test_routing_e2e import flush, system_prompt

pytestmark = pytest.mark.slow  # real engine workers


async def test_messages_report_cache_reads_and_responses_chain_on_the_cached_prefix(
    two_workers, gateway
) -> None:
    await flush(two_workers)
    async with gateway(two_workers, "cache_aware") as (base, _):
        claude = anthropic.AsyncAnthropic(base_url=base, api_key="unused", max_retries=0)
        model = (await openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused").models.list()).data[0].id
        system = [{"type": "text", "text": system_prompt("harbour"), "cache_control": {"type": "ephemeral"}}]
        usages = []
        for question in ("One word?", "Another word?"):
            message = await claude.messages.create(
                model=model,
                max_tokens=2,
                system=system,
                messages=[{"role": "user", "content": question}],
                extra_body={"temperature": 0},
            )
            usages.append(message.usage)
        assert usages[0].cache_creation_input_tokens > 0
        assert usages[1].cache_read_input_tokens > 0

        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        first = await client.responses.create(
            model=model, input=system_prompt("orchard") + "\nOne word?", max_output_tokens=2, temperature=0
        )
        chained = await client.responses.create(
            model=model, previous_response_id=first.id, input="Another word?", max_output_tokens=2
        )
        assert chained.usage is not None and first.usage is not None
        assert chained.usage.input_tokens > first.usage.input_tokens  # the whole conversation was sent
        assert chained.usage.input_tokens_details.cached_tokens > 0
