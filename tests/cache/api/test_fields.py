"""The request body itself (``cache.api.fields.parse_json``): hostile JSON is a 400, never a 500."""

from __future__ import annotations

import pytest

from cache.api.errors import ApiError
from cache.api.fields import parse_json


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000,
        b'{"a":' * 100_000,
        b'{"n": 1' + b"0" * 5000 + b"}",
        b'{"prompt": "\\ud800"}',
        b'{"prompt": "ok", "stop": ["\\uDFFF"]}',
        b"\xff",
        b"[]",
    ],
    ids=[
        "deep_array",
        "deep_object",
        "huge_int",
        "lone_surrogate",
        "lone_low_surrogate",
        "not_utf8",
        "not_object",
    ],
)
def test_hostile_json_is_a_400(raw: bytes) -> None:
    with pytest.raises(ApiError) as refused:
        parse_json(raw)
    assert refused.value.status == 400


def test_escaped_surrogate_pairs_are_valid_text() -> None:
    assert parse_json(b'{"prompt": "\\ud83d\\ude80 \\\\ud800"}') == {"prompt": "\U0001f680 \\ud800"}
