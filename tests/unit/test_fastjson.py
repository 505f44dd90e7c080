"""``proxy.fastjson.loads`` reads exactly what ``json.loads`` reads, and refuses what it refuses:
what the proxy sees in a body must not depend on which parser ran."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import fastjson

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)  # past 64 bits: orjson refuses those
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()  # lone surrogates included
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to itself and the types kept apart (1 is not 1.0 or True)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def outcome(parse: Any, data: bytes) -> tuple[str, Any]:
    try:
        return "ok", parse(data)
    except RecursionError:
        return "error", "RecursionError"
    except ValueError:
        return "error", "ValueError"


@settings(max_examples=300, deadline=None)
@given(
    doc=values,
    ascii_only=st.booleans(),
    encoding=st.sampled_from(["utf-8", "utf-16", "utf-32", "utf-8-sig"]),
)
def test_every_document_json_reads_is_read_the_same(
    doc: Any, ascii_only: bool, encoding: str
) -> None:
    text = json.dumps(doc, ensure_ascii=ascii_only)
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError:  # a lone surrogate cannot be encoded without escapes
        data = json.dumps(doc).encode()
    kind, expected = outcome(json.loads, data)
    got_kind, got = outcome(fastjson.loads, data)
    assert kind == got_kind
    assert same(expected, got)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_any_bytes_are_refused_or_read_as_json_does(data: bytes) -> None:
    kind, expected = outcome(json.loads, data)
    got_kind, got = outcome(fastjson.loads, data)
    assert kind == got_kind
    assert same(expected, got)


@pytest.mark.parametrize(
    "data",
    [
        b'{"model": "a", "model": "b"}',
        b"[NaN, Infinity, -Infinity]",
        b'"\\udfff"',
        b"\xef\xbb\xbf{}",
        b"1" * 40,
        b"[" * 2000 + b"]" * 2000,
        b'{"a": 1e400}',
    ],
)
def test_the_inputs_where_the_parsers_differ(data: bytes) -> None:
    assert outcome(fastjson.loads, data)[0] == outcome(json.loads, data)[0]
    if outcome(json.loads, data)[0] == "ok":
        assert same(fastjson.loads(data), json.loads(data))
