"""Tool calls in a model's output text -> structured calls: one small parser per model family's format.

A chat template that renders ``tools`` also tells the model how to call them, in its family's own text
format (Qwen2/Qwen2.5 and Hermes: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``). The
engine feeds its output through the parser the template names and answers OpenAI's ``tool_calls``.
Adding a family is one ``ToolCallParser`` subclass in ``PARSERS``: how it recognises its template, and
how it cuts calls out of a stream of text.

Torch-free: the engine uses it, and it must never turn text into an error. Whatever is not a
well-formed call (a malformed body, a block the output ended inside) stays content, verbatim.
"""

from __future__ import annotations

import functools
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the function's name and its arguments as JSON text of an object
    (OpenAI's ``function.arguments``)."""

    name: str
    arguments: str


@dataclass(frozen=True)
class Piece:
    """One step of parsed output, in order: content text, or (``call`` set) one whole tool call."""

    text: str = ""
    call: ToolCall | None = None


class ToolCallParser(ABC):
    """Cuts tool calls out of a model's output, streaming: ``feed`` every text delta in order, then
    ``finish`` once. The pieces returned, concatenated, are the output with every well-formed call
    replaced by its ``ToolCall``.

    Invariants: never raises, whatever the text; an output without calls comes back as exactly its
    text (deltas may be held back and merged, never changed); text that is not a well-formed call comes
    back verbatim as content; only what could still be part of a call is held back (a partial opening
    tag, an open block, whitespace next to a block), so plain text streams with at most that delay.
    One instance parses one output.
    """

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def matches(cls, chat_template: str) -> bool:
        """Whether a chat template asks the model for this format."""

    @abstractmethod
    def feed(self, text: str) -> list[Piece]:
        """The pieces ``text`` completes (often none: held back until it is known whether it is a call)."""

    @abstractmethod
    def finish(self) -> list[Piece]:
        """The pieces still held back when the output has ended."""

    def parse(self, text: str) -> list[Piece]:
        """A whole output at once: exactly what streaming it would give."""
        return _merge([*self.feed(text), *self.finish()])


class HermesToolCallParser(ToolCallParser):
    """``<tool_call>{"name": "f", "arguments": {...}}</tool_call>``, as Qwen2, Qwen2.5 and Hermes
    templates ask (the body may have whitespace around it; ``parameters`` is read as ``arguments``).
    Whitespace between blocks and around them is the format's separator, not content."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        self._buffer = ""  # text received and not yet returned
        self._in_call = False  # the buffer holds the body of an open block (after OPEN)
        self._before_call = ""  # whitespace just before the open block: content if the block is not a call
        self._after_call = False  # just closed a call: leading whitespace is its separator
        self._searched = 0  # the open block's body before this offset holds no CLOSE

    @classmethod
    def matches(cls, chat_template: str) -> bool:
        return cls.OPEN in chat_template and cls.CLOSE in chat_template

    def feed(self, text: str) -> list[Piece]:
        self._buffer += text
        pieces: list[Piece] = []
        while True:
            if self._in_call:
                end = self._buffer.find(self.CLOSE, self._searched)
                if end < 0:  # search only new text next time: a long block costs linear time
                    self._searched = max(0, len(self._buffer) - len(self.CLOSE) + 1)
                    break
                body, self._buffer = self._buffer[:end], self._buffer[end + len(self.CLOSE) :]
                self._in_call = False
                call = parse_call_json(body)
                if call is None:
                    pieces.append(Piece(self._before_call + self.OPEN + body + self.CLOSE))
                else:
                    pieces.append(Piece(call=call))
                self._before_call, self._after_call = "", call is not None
                continue
            if self._after_call:
                self._buffer = self._buffer.lstrip()
                if not self._buffer:
                    break
                self._after_call = False
            start = self._buffer.find(self.OPEN)
            if start >= 0:
                before = self._buffer[:start]
                content = before.rstrip()
                pieces.append(Piece(content))
                self._before_call = before[len(content) :]
                self._buffer, self._in_call = self._buffer[start + len(self.OPEN) :], True
                self._searched = 0
                continue
            # Hold back a possible start of OPEN and trailing whitespace (it may precede a block).
            keep = _partial_suffix(self._buffer, self.OPEN)
            head = self._buffer[: len(self._buffer) - keep]
            content = head.rstrip()
            pieces.append(Piece(content))
            self._buffer = self._buffer[len(content) :]
            break
        return [p for p in pieces if p.text or p.call]

    def finish(self) -> list[Piece]:
        if self._in_call:  # the output ended inside a block: it was never a call
            text = self._before_call + self.OPEN + self._buffer
        else:
            text = "" if self._after_call else self._buffer
        self._buffer, self._in_call, self._before_call = "", False, ""
        return [Piece(text)] if text else []


def parse_call_json(body: str) -> ToolCall | None:
    """``{"name": "f", "arguments": {...}}`` (or ``parameters``) as a call; None if it is not one."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments: Any = value.get("arguments", value.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _merge(pieces: list[Piece]) -> list[Piece]:
    """Adjacent content pieces joined (what a whole-output parse returns)."""
    out: list[Piece] = []
    for piece in pieces:
        if piece.call is None and out and out[-1].call is None:
            out[-1] = Piece(out[-1].text + piece.text)
        elif piece.text or piece.call:
            out.append(piece)
    return out


PARSERS: tuple[type[ToolCallParser], ...] = (HermesToolCallParser,)


@functools.lru_cache(maxsize=16)  # a pure memo on the template's text
def parser_for_template(chat_template: str | None) -> str | None:
    """The name of the parser for the tool-call format ``chat_template`` defines, None if none we know."""
    if not chat_template:
        return None
    return next((p.name for p in PARSERS if p.matches(chat_template)), None)


def new_parser(name: str) -> ToolCallParser:
    """A fresh parser for one output (``name`` from ``parser_for_template``)."""
    return next(p for p in PARSERS if p.name == name)()


def split_pieces(pieces: list[Piece]) -> tuple[str, list[ToolCall]]:
    """A parsed output's content (the text pieces joined) and its calls, in order."""
    return "".join(p.text for p in pieces if p.call is None), [p.call for p in pieces if p.call]
