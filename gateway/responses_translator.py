"""A worker's chat-completions answer as an OpenAI Responses API answer: the ``response`` object, or its
event stream (``response.created`` ... ``response.output_text.delta`` ... ``response.completed``).

Output items follow the answer in order: its text is a ``message`` item, each tool call a ``function_call``
item (``call_id`` the worker's tool-call id, which the client answers with ``function_call_output``). A
stream holds one item open at a time, as OpenAI's does: a tool call closes the message before it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from cache.api.replies import Usage
from gateway.translation import AnswerPart, ReplyTranslator, ToolCall, sse_event

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
    "tool_choice": "auto",
    "tools": [],
    "parallel_tool_calls": True,
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


@dataclass
class _Item:
    """One output item of a streamed answer: a message (its text so far) or the tool call ``call``."""

    item_id: str
    call: int | None = None
    texts: list[str] = field(default_factory=list)


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
        self.items: list[_Item] = []  # a stream's output items, in order; the last one may be open
        self.open = False  # the last item is open (its done events not sent)
        self.sequence = 0

    # -- the response object --------------------------------------------------------------------------
    def response(self, status: str, output: list[dict[str, Any]] | None) -> dict[str, Any]:
        """The response object; ``output`` None while in progress (no output yet)."""
        incomplete = status == "incomplete"
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": output or [],
            "usage": None if output is None else response_usage(self.usage),
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "store": self.store,
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            **self.echoed,
        }

    def _output(self, status: str) -> list[dict[str, Any]]:
        """The output items: a stream's as it opened them; a whole reply's, its text, then its calls."""
        if not self.items:
            text = "".join(self.texts)
            if text or not self.tool_calls:  # an empty answer is still one (empty) message
                self.items.append(_Item(_new_id("msg"), texts=[text]))
            self.items += [_Item(_new_id("fc"), call=i) for i in range(len(self.tool_calls))]
        return [self._item(item, status) for item in self.items]

    def _item(self, item: _Item, status: str) -> dict[str, Any]:
        if item.call is not None:
            return _call_item(item.item_id, self.tool_calls[item.call], status)
        content = [] if status == "in_progress" else [_text_part("".join(item.texts))]
        return {
            "type": "message",
            "id": item.item_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    async def _complete(self) -> dict[str, Any]:
        """The final response object, stored first when asked."""
        status = "incomplete" if self.finish_reason == "length" else "completed"
        response = self.response(status, self._output("completed"))
        if self.save is not None:
            messages = [*self.conversation, self.chat_message("".join(self.texts))]
            if not await self.save(self.response_id, {"response": response, "messages": messages}):
                log.warning("response %s is too large to store: it cannot be chained on", self.response_id)
        return response

    # -- ReplyTranslator ------------------------------------------------------------------------------
    async def reply(self, reply: dict[str, Any]) -> bytes:
        text = self.read_reply(reply)
        if text:
            self.texts.append(text)
        return orjson.dumps(await self._complete())

    def start(self) -> bytes:
        return self._event("response.created", response=self.response("in_progress", None)) + self._event(
            "response.in_progress", response=self.response("in_progress", None)
        )

    def chunk(self, chunk: dict[str, Any]) -> bytes:
        return b"".join(self._part(part) for part in self.read_chunk(chunk))

    def _part(self, part: AnswerPart) -> bytes:
        events = []
        index = len(self.items) - 1
        if part.call is None:
            if not self.open or self.items[-1].call is not None:
                events.append(self._close())
                events.append(self._add(_Item(_new_id("msg"))))
                index += 1
            self.items[-1].texts.append(part.text)
            where = {"item_id": self.items[-1].item_id, "output_index": index, "content_index": 0}
            events.append(self._event("response.output_text.delta", **where, delta=part.text, logprobs=[]))
        else:
            if part.opens:
                events.append(self._close())
                events.append(self._add(_Item(_new_id("fc"), call=part.call)))
                index += 1
            if part.text and self.open and self.items[-1].call == part.call:  # else: in the done event
                where = {"item_id": self.items[-1].item_id, "output_index": index}
                events.append(self._event("response.function_call_arguments.delta", **where, delta=part.text))
        return b"".join(events)

    def _add(self, item: _Item) -> bytes:
        """Open ``item``: its added events."""
        self.items.append(item)
        self.open = True
        index = len(self.items) - 1
        added = self._event(
            "response.output_item.added", output_index=index, item=self._item(item, "in_progress")
        )
        if item.call is not None:
            return added
        where = {"item_id": item.item_id, "output_index": index, "content_index": 0}
        return added + self._event("response.content_part.added", **where, part=_text_part(""))

    def _close(self) -> bytes:
        """Close the open item, if any: its done events."""
        if not self.open:
            return b""
        self.open = False
        item, index = self.items[-1], len(self.items) - 1
        events = []
        if item.call is not None:
            arguments = self.tool_calls[item.call].arguments
            where = {"item_id": item.item_id, "output_index": index}
            events.append(self._event("response.function_call_arguments.done", **where, arguments=arguments))
        else:
            text = "".join(item.texts)
            where = {"item_id": item.item_id, "output_index": index, "content_index": 0}
            events.append(self._event("response.output_text.done", **where, text=text, logprobs=[]))
            events.append(self._event("response.content_part.done", **where, part=_text_part(text)))
        item_done = self._item(item, "completed")
        events.append(self._event("response.output_item.done", output_index=index, item=item_done))
        return b"".join(events)

    async def finish(self) -> bytes:
        events = [self._close()]
        if not self.items:  # an empty answer is still one (empty) message
            events += [self._add(_Item(_new_id("msg"))), self._close()]
        response = await self._complete()
        name = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return b"".join([*events, self._event(name, response=response)])

    def failed(self, message: str) -> bytes:
        response = self.response("failed", [self._item(item, "incomplete") for item in self.items])
        response["error"] = {"code": "server_error", "message": message}
        return self._event("response.failed", response=response)

    def _event(self, name: str, **fields: Any) -> bytes:
        self.sequence += 1
        return sse_event(name, {"type": name, "sequence_number": self.sequence - 1, **fields})


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _call_item(item_id: str, call: ToolCall, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call.call_id,
        "name": call.name,
        "arguments": call.arguments,
        "status": status,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
