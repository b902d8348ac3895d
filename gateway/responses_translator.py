"""A worker's chat-completions answer as an OpenAI Responses API answer: the ``response`` object, or its
event stream (``response.created`` ... ``response.output_text.delta`` ... ``response.completed``)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from cache.api.replies import Usage
from gateway.translation import ReplyTranslator, sse_event

log = logging.getLogger(__name__)

SaveResponse = Callable[[str, dict[str, Any]], Awaitable[bool]]

# Request fields echoed in the response object, with OpenAI's defaults.
_ECHOED = {
    "instructions": None,
    "max_output_tokens": None,
    "metadata": {},
    "previous_response_id": None,
    "prompt_cache_key": None,
    "temperature": 1.0,
    "top_p": 1.0,
    "user": None,
}


def response_usage(usage: Usage | None) -> dict[str, Any]:
    """Chat usage as Responses usage (``input_tokens_details.cached_tokens`` from the worker's)."""
    usage = usage or Usage()
    prompt, completion = usage.prompt_tokens or 0, usage.completion_tokens or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens or 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


class ResponsesTranslator(ReplyTranslator):
    """``conversation``: the chat messages sent, without the instructions' system message; with the
    answer appended it is what a later ``previous_response_id`` continues. ``save``: store the record
    (``gateway.response_store``), or None for ``store: false``."""

    def __init__(
        self,
        response_id: str,
        request: dict[str, Any],
        model: str,
        created_at: int,
        conversation: list[dict[str, Any]],
        save: SaveResponse | None,
    ) -> None:
        super().__init__()
        self.response_id, self.model, self.created_at = response_id, model, created_at
        self.echoed = {name: request.get(name, default) for name, default in _ECHOED.items()}
        self.store = save is not None
        self.conversation, self.save = conversation, save
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.sequence = 0

    # -- the response object --------------------------------------------------------------------------
    def response(self, status: str, text: str | None) -> dict[str, Any]:
        """The response object; ``text`` None while in progress (no output yet)."""
        incomplete = status == "incomplete"
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": [] if text is None else [self._item(text, "completed")],
            "usage": None if text is None else response_usage(self.usage),
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "store": self.store,
            "parallel_tool_calls": False,
            "tool_choice": "auto",
            "tools": [],
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            **self.echoed,
        }

    def _item(self, text: str, status: str) -> dict[str, Any]:
        content = [] if status == "in_progress" else [_text_part(text)]
        return {
            "type": "message",
            "id": self.item_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    async def _complete(self, text: str) -> dict[str, Any]:
        """The final response object, stored first when asked."""
        response = self.response("incomplete" if self.finish_reason == "length" else "completed", text)
        if self.save is not None:
            messages = [*self.conversation, {"role": "assistant", "content": text}]
            if not await self.save(self.response_id, {"response": response, "messages": messages}):
                log.warning("response %s is too large to store: it cannot be chained on", self.response_id)
        return response

    # -- ReplyTranslator ------------------------------------------------------------------------------
    async def reply(self, reply: dict[str, Any]) -> bytes:
        return orjson.dumps(await self._complete(self.read_reply(reply)))

    def start(self) -> bytes:
        part = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return b"".join(
            [
                self._event("response.created", response=self.response("in_progress", None)),
                self._event("response.in_progress", response=self.response("in_progress", None)),
                self._event("response.output_item.added", output_index=0, item=self._item("", "in_progress")),
                self._event("response.content_part.added", **part, part=_text_part("")),
            ]
        )

    def chunk(self, chunk: dict[str, Any]) -> bytes:
        text = self.read_chunk(chunk)
        if not text:
            return b""
        return self._event(
            "response.output_text.delta",
            item_id=self.item_id,
            output_index=0,
            content_index=0,
            delta=text,
            logprobs=[],
        )

    async def finish(self) -> bytes:
        text = "".join(self.texts)
        part = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        done = [
            self._event("response.output_text.done", **part, text=text, logprobs=[]),
            self._event("response.content_part.done", **part, part=_text_part(text)),
            self._event("response.output_item.done", output_index=0, item=self._item(text, "completed")),
        ]
        response = await self._complete(text)
        name = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return b"".join([*done, self._event(name, response=response)])

    def failed(self, message: str) -> bytes:
        response = self.response("failed", "".join(self.texts))
        response["error"] = {"code": "server_error", "message": message}
        return self._event("response.failed", response=response)

    def _event(self, name: str, **fields: Any) -> bytes:
        self.sequence += 1
        return sse_event(name, {"type": name, "sequence_number": self.sequence - 1, **fields})


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
