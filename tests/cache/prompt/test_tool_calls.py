"""The tool-call parsers: calls cut out of a model's output, the same whole or streamed in any pieces,
and never an error: text that is not a well-formed call stays content, verbatim."""

from __future__ import annotations

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from cache.prompt.tool_calls import (
    HermesToolCallParser,
    ToolCall,
    parser_for_template,
    split_pieces,
)
from tests.tiny_qwen2 import CHAT_TEMPLATE

CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
WEATHER = ToolCall("get_weather", '{"city": "Paris"}')


def whole(text: str) -> tuple[str, list[ToolCall]]:
    return split_pieces(HermesToolCallParser().parse(text))


def streamed(text: str, cuts: tuple[int, ...]) -> tuple[str, list[ToolCall]]:
    parser, pieces, start = HermesToolCallParser(), [], 0
    for cut in (*cuts, len(text)):
        pieces += parser.feed(text[start:cut])
        start = cut
    return split_pieces(pieces + parser.finish())


OUTPUTS = {
    "qwen's own layout": (f"<tool_call>\n{CALL}\n</tool_call>", ("", [WEATHER])),
    "text, then two calls": (
        f"Let me check.\n<tool_call>\n{CALL}\n</tool_call>\n<tool_call>{CALL}</tool_call>\n",
        ("Let me check.", [WEATHER, WEATHER]),
    ),
    "text after a call": (f"<tool_call>{CALL}</tool_call>\n\nDone.", ("Done.", [WEATHER])),
    "parameters for arguments": (
        '<tool_call>{"name": "f", "parameters": {"x": "é<b>"}}</tool_call>',
        ("", [ToolCall("f", '{"x": "é<b>"}')]),
    ),
    "no arguments": ('<tool_call>{"name": "now"}</tool_call>', ("", [ToolCall("now", "{}")])),
    "plain text": ("The answer is 4.\n\n", ("The answer is 4.\n\n", [])),
    "a tag-like start": ("a < b and <tool_c", ("a < b and <tool_c", [])),
    "not JSON": ("x <tool_call>{name: f}</tool_call> y", ("x <tool_call>{name: f}</tool_call> y", [])),
    "a JSON array": ("<tool_call>[1]</tool_call>", ("<tool_call>[1]</tool_call>", [])),
    "arguments not an object": (
        '<tool_call>{"name": "f", "arguments": "x"}</tool_call>',
        ('<tool_call>{"name": "f", "arguments": "x"}</tool_call>', []),
    ),
    "an empty name": ('<tool_call>{"name": ""}</tool_call>', ('<tool_call>{"name": ""}</tool_call>', [])),
    "cut off inside a call": (f"Sure \n<tool_call>\n{CALL[:20]}", (f"Sure \n<tool_call>\n{CALL[:20]}", [])),
    "a bad call between good ones": (
        f"<tool_call>{CALL}</tool_call> <tool_call>oops</tool_call> <tool_call>{CALL}</tool_call>",
        ("<tool_call>oops</tool_call>", [WEATHER, WEATHER]),
    ),
}


def test_outputs_parse_into_content_and_calls() -> None:
    for name, (text, expected) in OUTPUTS.items():
        assert whole(text) == expected, name


def test_streaming_in_any_pieces_gives_the_whole_parse() -> None:
    for name, (text, expected) in OUTPUTS.items():
        for cut in range(len(text) + 1):
            assert streamed(text, (cut,)) == expected, (name, cut)
        every_char = tuple(range(1, len(text)))
        assert streamed(text, every_char) == expected, name
        for cuts in itertools.islice(itertools.combinations(range(1, len(text), 3), 3), 200):
            assert streamed(text, cuts) == expected, (name, cuts)


def test_plain_text_streams_at_once_but_for_what_may_open_a_call() -> None:
    parser = HermesToolCallParser()
    assert [p.text for p in parser.feed("Hello world")] == ["Hello world"]
    assert [p.text for p in parser.feed(", see <tool")] == [", see"]  # " <tool" may open a call
    assert [p.text for p in parser.feed("box> ok")] == [" <toolbox> ok"]
    assert [p.text for p in parser.finish()] == []


PARTS = ["<tool_call>", "</tool_call>", CALL, "{", '"name": "f"}', " ", "\n", "x", "<t", "é"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PARTS), max_size=12), st.data())
def test_any_output_parses_without_error_and_loses_no_text(parts: list[str], data) -> None:
    text = "".join(parts)
    cuts = tuple(sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=5))))
    content, calls = streamed(text, cuts)
    assert (content, calls) == whole(text)
    if not calls:
        assert content == text  # no call: the output is exactly its text
    for call in calls:
        assert isinstance(json.loads(call.arguments), dict)


def test_the_template_names_the_format() -> None:
    assert parser_for_template(CHAT_TEMPLATE) == "hermes"
    smollm2 = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% endfor %}"
    assert parser_for_template(smollm2) is None
    assert parser_for_template(None) is None
