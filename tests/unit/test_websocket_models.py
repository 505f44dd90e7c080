"""Where a WebSocket session names its model (SPEC §3.3): the query string at the upgrade and the
client's events. Property-based: every spelling a lenient server could read as ``model`` is read,
and two readings that disagree are refused."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.dataplane.app import BodyError
from proxy.dataplane.websocket import _sendable, error_event, event_models, query_model
from proxy.errors import CODES

NAMES = ("gpt-5.6-sol", "gpt-4o-mini", "gpt-5.5-alpha")
MODEL_KEYS = ("model", "Model", "MODEL", " model", "model ", "%6Dodel", "mod%65l", "+model+")
OTHER_KEYS = ("voice", "models", "amodel", "model_", "x", "")


def spelled(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from(
        [name, name.upper(), f"+{name}", f"%20{name}%09", quote(name, safe=""), f"{name}%20"]
    )


PART = st.one_of(
    st.tuples(st.just(True), st.sampled_from(MODEL_KEYS), st.sampled_from(NAMES)),
    st.tuples(st.just(False), st.sampled_from(OTHER_KEYS), st.sampled_from(NAMES)),
)


def _query(
    parts: list[tuple[bool, str, str]], data: st.DataObject, seps: str
) -> tuple[str, set[str]]:
    pieces = []
    named = set()
    for is_model, key, name in parts:
        pieces.append(f"{key}={data.draw(spelled(name))}")
        if is_model:
            named.add(name)
    separators = data.draw(st.lists(st.sampled_from(seps), min_size=len(pieces)))
    return "".join((separators[i] if i else "") + p for i, p in enumerate(pieces)), named


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(PART, max_size=5), data=st.data())
def test_query_model_reads_every_spelling_and_refuses_disagreement(
    parts: list[tuple[bool, str, str]], data: st.DataObject
) -> None:
    query, named = _query(parts, data, "&")
    if len(named) > 1:
        with pytest.raises(BodyError) as refused:
            query_model(query)
        assert refused.value.code == "invalid_request"
    else:
        assert query_model(query) == (named.pop() if named else None)


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(PART, max_size=5), data=st.data())
def test_query_model_with_semicolons_reads_the_one_model_or_refuses(
    parts: list[tuple[bool, str, str]], data: st.DataObject
) -> None:
    """Split on ``;`` by some servers and not by others: whatever is read is the one model
    named, and a query that names two is never read as one of them."""
    query, named = _query(parts, data, "&;")
    try:
        read = query_model(query)
    except BodyError:
        return
    assert len(named) <= 1, query
    assert read == (named.pop() if named else None), query


@pytest.mark.parametrize(
    "query",
    [
        "model=gpt-4o-mini;model=gpt-5.6-sol",  # one value for a '&' reader, two for a ';' one
        "model=gpt-4o-mini&model=",
        "model=gpt-4o-mini&MODEL=gpt-5.6-sol",
        "model=gpt-4o-mini&%6dodel=gpt-5.6-sol",
    ],
)
def test_query_model_refuses_queries_two_readers_could_read_differently(query: str) -> None:
    with pytest.raises(BodyError):
        query_model(query)


def test_query_model_without_a_model() -> None:
    assert query_model("") is None
    assert query_model("model=") is None
    assert query_model("voice=alloy&models=gpt-5.6-sol") is None
    assert query_model("model=gpt-4o-mini&model=GPT-4o-mini%20") == "gpt-4o-mini"


@given(
    model=st.sampled_from(NAMES).flatmap(
        lambda n: st.sampled_from([n, n.upper(), f" {n}\t", n.title()])
    ),
    holder=st.sampled_from(["session", "response"]),
    kind=st.sampled_from(["session.update", "response.create", "Session.Update", "x"]),
)
def test_event_models_read_session_and_response_model_of_any_event(
    model: str, holder: str, kind: str
) -> None:
    text = json.dumps({"type": kind, holder: {"model": model, "voice": "alloy"}})
    assert event_models(text, binary=False) == (model.strip().lower(),)
    assert event_models(text.encode(), binary=True) == (model.strip().lower(),)


@pytest.mark.parametrize(
    "text",
    [
        '{"type": "session.update", "session": {"model": "a", "model": "b"}}',
        '{"type": "session.update", "session": {"model": "a", "\\u006dodel": "b"}}',
        '{"type": "session.update", "session": {"model": "a"}, "session": {"model": "b"}}',
        '{"type": "session.update", "type": "x", "session": {"model": "a"}}',
        '{"type": "session.update", "session": {"model": 5}}',
        '{"type": "session.update", "session": {"model": "  "}}',
        '{"type": "session.update", "session": {"model": null}}',
        "[1, 2]",
        "not json",
        "[" * 100_000,
    ],
)
def test_event_models_refuse_what_two_readers_could_read_differently(text: str) -> None:
    with pytest.raises(BodyError) as refused:
        event_models(text, binary=False)
    assert refused.value.code == "invalid_request"


def test_binary_frames_that_are_not_json_pass_as_they_are() -> None:
    assert event_models(bytes(range(256)), binary=True) is None
    assert event_models(b"[1]", binary=True) is None
    assert (
        event_models(b'{"type": "input_audio_buffer.append", "audio": "AAAA"}', binary=True) == ()
    )
    with pytest.raises(BodyError):
        event_models(b'{"session": {"model": "a", "model": "b"}}', binary=True)


def test_error_event_has_the_openai_error_shape() -> None:
    doc = json.loads(error_event("model_not_found", event_id="evt_1"))
    assert doc["type"] == "error"
    assert doc["error"] == {
        "message": CODES["model_not_found"].message,
        "type": "invalid_request_error",
        "code": "model_not_found",
        "param": None,
        "event_id": "evt_1",
    }


@pytest.mark.parametrize(
    ("received", "sent"),
    [
        (None, 1000),
        (0, 1000),
        (1000, 1000),
        (1001, 1001),
        (1005, 1000),
        (1006, 1011),
        (1008, 1008),
        (1015, 1011),
        (4000, 4000),
        (999, 1000),
        (2999, 1000),
        (5000, 1000),
    ],
)
def test_close_codes_pass_through_when_a_peer_may_send_them(
    received: int | None, sent: int
) -> None:
    assert _sendable(received) == sent
