"""Usage asked for on the client's behalf: the request rewrite keeps the client's JSON, and the
answer is turned back, byte for byte, into the stream the client would have got without it."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.dataplane.usage_stream import (
    UsageHider,
    rewrite_event,
    wants_usage_added,
    with_usage_asked,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
# Text that tries to look like the member the hider cuts out.
tricky_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(['"usage":null', '", "usage": null, "', "usage\\", '\\"usage\\":null', "}{,"]),
)


@settings(max_examples=150, deadline=None)
@given(
    extra=st.dictionaries(
        st.text(max_size=10).filter(lambda k: k not in ("model", "stream", "stream_options")),
        json_values,
        max_size=4,
    ),
    options=st.one_of(
        st.just("absent"),
        st.none(),
        st.dictionaries(st.sampled_from(["include_usage", "include_obfuscation"]), json_values),
    ),
    compact=st.booleans(),
    ascii_only=st.booleans(),
    trailing=st.sampled_from(["", "\n", "  \r\n"]),
)
def test_the_rewritten_request_is_the_clients_json_with_usage_asked(
    extra: dict[str, Any], options: Any, compact: bool, ascii_only: bool, trailing: str
) -> None:
    doc: dict[str, Any] = {"model": "m", "stream": True, **extra}
    if options != "absent":
        doc["stream_options"] = options
    separators = (",", ":") if compact else (", ", ": ")
    body = (json.dumps(doc, separators=separators, ensure_ascii=ascii_only) + trailing).encode()
    if not wants_usage_added("POST", "/v1/chat/completions", doc):
        assert isinstance(options, dict) and options.get("include_usage") is True
        return
    asked = with_usage_asked(body, doc)
    assert asked is not None
    expected = {
        **doc,
        "stream_options": {**(doc.get("stream_options") or {}), "include_usage": True},
    }
    assert json.loads(asked) == expected
    if options == "absent":  # every byte of the client's body is kept
        assert asked.startswith(body.rstrip()[:-1])


def test_only_chat_streams_that_did_not_ask_are_rewritten() -> None:
    chat = "/v1/chat/completions"
    assert wants_usage_added("POST", chat, {"model": "m", "stream": True})
    assert wants_usage_added("POST", chat, {"stream": True, "stream_options": {}})
    assert wants_usage_added("POST", chat, {"stream": True, "stream_options": {"include_usage": 0}})
    assert not wants_usage_added(
        "POST", chat, {"stream": True, "stream_options": {"include_usage": True}}
    )
    assert not wants_usage_added("POST", chat, {"stream": False})
    assert not wants_usage_added("POST", chat, {"stream": "true"})
    assert not wants_usage_added("POST", "/v1/responses", {"stream": True})
    assert not wants_usage_added("POST", "/v1/completions", {"stream": True})
    assert not wants_usage_added("GET", chat, {"stream": True})
    assert not wants_usage_added("POST", chat, [1, 2])
    # Options of a wrong type go as sent, for the upstream to refuse.
    assert (
        with_usage_asked(
            b'{"stream":true,"stream_options":3}', {"stream": True, "stream_options": 3}
        )
        is None
    )


def _chunk(index: int, text: str | None, finish: str | None) -> dict[str, Any]:
    delta: dict[str, Any] = {} if text is None else {"content": text}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-5.6-sol",
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def _with_usage(chunk: dict[str, Any], at: int, value: Any) -> dict[str, Any]:
    items = list(chunk.items())
    items.insert(at % (len(items) + 1), ("usage", value))
    return dict(items)


def _event(obj: Any, sep: tuple[str, str], ascii_only: bool, crlf: bool) -> bytes:
    end = "\r\n" if crlf else "\n"
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=sep, ensure_ascii=ascii_only)
    return f"data: {data}{end}{end}".encode()


@settings(max_examples=150, deadline=None)
@given(
    texts=st.lists(tricky_text, min_size=1, max_size=6),
    at=st.integers(0, 10),
    compact=st.booleans(),
    ascii_only=st.booleans(),
    crlf=st.booleans(),
    cuts=st.lists(st.integers(0, 10**6), max_size=10),
)
def test_the_client_gets_exactly_the_stream_it_asked_for(
    texts: list[str], at: int, compact: bool, ascii_only: bool, crlf: bool, cuts: list[int]
) -> None:
    sep = (",", ":") if compact else (", ", ": ")
    chunks = [_chunk(i, t, None) for i, t in enumerate(texts)] + [_chunk(0, None, "stop")]
    usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    final = {**_chunk(0, None, None), "choices": [], "usage": usage}
    plain = b"".join(_event(c, sep, ascii_only, crlf) for c in chunks)
    plain += _event("[DONE]", sep, ascii_only, crlf)
    with_usage = b"".join(_event(_with_usage(c, at, None), sep, ascii_only, crlf) for c in chunks)
    with_usage += _event(final, sep, ascii_only, crlf) + _event("[DONE]", sep, ascii_only, crlf)

    side: list[bytes] = []
    hider = UsageHider(None, side.append)
    out = b""
    start = 0
    for cut in sorted(c % (len(with_usage) + 1) for c in cuts):
        out += hider.feed(with_usage[start:cut])
        start = cut
    out += hider.feed(with_usage[start:]) + hider.finish()
    assert out == plain
    assert b"".join(side) == with_usage  # the meter reads the stream as the upstream sent it


def test_events_the_hider_leaves_alone() -> None:
    for event in (
        b"data: [DONE]\n\n",
        b": keep-alive\n\n",
        b'data: {"choices": [], "note": "no usage member"}\n\n',
        b"data: not json\n\n",
        b'event: error\ndata: {"error": {"message": "x"}}\n\n',
    ):
        assert rewrite_event(event) == event


def test_usage_on_a_chunk_with_choices_is_removed_and_the_rest_kept() -> None:
    event = b'data: {"choices":[{"index":0}],"usage":{"prompt_tokens":1}}\n\n'
    assert json.loads(rewrite_event(event)[6:]) == {"choices": [{"index": 0}]}
    multi = b'data: {"choices": [],\ndata: "usage": {"prompt_tokens": 1}}\n\n'
    assert rewrite_event(multi) == b""
    nested = b'data: {"choices":[{"usage":null}],"usage":null}\n\n'
    assert rewrite_event(nested) == b'data: {"choices":[{"usage":null}]}\n\n'


def test_an_unterminated_last_event_goes_out_as_sent() -> None:
    hider = UsageHider(None, lambda _: None)
    assert hider.feed(b'data: {"usage": null, "a": 1}\n\ndata: {"partial') == b'data: {"a": 1}\n\n'
    assert hider.finish() == b'data: {"partial'
