"""Where an open WebSocket session names its model (SPEC §3.3): the client's events (the query
string at the upgrade is read by ``proxy.surfaces``, tested with it). Every ``model`` an upstream
could read in an event is read, and an event two readers could read differently is refused."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.dataplane.websocket import _sendable, error_event, event_models
from proxy.errors import CODES
from proxy.surfaces import BodyError

NAMES = ("gpt-5.6-sol", "gpt-4o-mini", "gpt-5.5-alpha")


@given(
    model=st.sampled_from(NAMES).flatmap(
        lambda n: st.sampled_from([n, n.upper(), f" {n}\t", n.title()])
    ),
    holder=st.sampled_from(["session", "response", None]),
    kind=st.sampled_from(["session.update", "response.create", "Session.Update", "x"]),
)
def test_event_models_read_session_and_response_model_of_any_event(
    model: str, holder: str, kind: str
) -> None:
    inner = {"model": model, "voice": "alloy"}
    event = {"type": kind, **inner} if holder is None else {"type": kind, holder: inner}
    text = json.dumps(event)
    assert event_models(text, binary=False) == (model,)
    assert event_models(text.encode(), binary=True) == (model,)


@pytest.mark.parametrize(
    "text",
    [
        '{"type": "session.update", "session": {"model": "a", "model": "b"}}',
        '{"type": "session.update", "session": {"model": "a", "\\u006dodel": "b"}}',
        '{"type": "session.update", "session": {"model": "a"}, "session": {"model": "b"}}',
        '{"type": "session.update", "type": "x", "session": {"model": "a"}}',
        '{"type": "session.update", "session": {"model": 5}}',
        "[1, 2]",
        "not json",
        "[" * 100_000,
    ],
)
def test_event_models_refuse_what_two_readers_could_read_differently(text: str) -> None:
    with pytest.raises(BodyError) as refused:
        event_models(text, binary=False)
    assert refused.value.code == "invalid_request"


@pytest.mark.parametrize("model", ["null", '""', '"  "'])
def test_an_empty_model_names_nothing(model: str) -> None:
    text = '{"type": "session.update", "session": {"model": ' + model + "}}"
    assert event_models(text, binary=False) == ()


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
