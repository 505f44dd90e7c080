"""The meter's side copy: whatever the split, a JSON body is kept whole up to the limit and by
its tail past it; a stream by its last complete events; a compressed copy decodes to the same."""

from __future__ import annotations

import gzip

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.dataplane.capture import SSE_CAPTURE_BYTES, TAIL_BYTES, Capture


def feed(capture: Capture, data: bytes, cuts: list[int]) -> bytes:
    at = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        capture.feed(data[at:cut])
        at = cut
    capture.feed(data[at:])
    return capture.finish(True)


@settings(max_examples=80, deadline=None)
@given(
    size=st.sampled_from([0, 1, 999, 1000, 1001, 5000, TAIL_BYTES + 17, 3 * TAIL_BYTES]),
    limit=st.sampled_from([1000, 4 * TAIL_BYTES]),
    cuts=st.lists(st.integers(0, 10**7), max_size=12),
    compressed=st.booleans(),
)
def test_a_json_body_whole_up_to_the_limit_then_its_tail(
    size: int, limit: int, cuts: list[int], compressed: bool
) -> None:
    body = bytes(i % 251 for i in range(size))
    sent = gzip.compress(body) if compressed else body
    capture = Capture(False, "gzip" if compressed else None, limit)
    kept = feed(capture, sent, cuts)
    assert capture.problem is None
    if size <= limit:
        assert capture.whole and kept == body
    else:
        assert not capture.whole and kept == body[-TAIL_BYTES:]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 9000), min_size=1, max_size=40),
    cuts=st.lists(st.integers(0, 10**7), max_size=12),
    crlf=st.booleans(),
)
def test_a_stream_keeps_its_last_complete_events(
    sizes: list[int], cuts: list[int], crlf: bool
) -> None:
    end = b"\r\n\r\n" if crlf else b"\n\n"
    events = [b"data: " + b"x" * n + end for n in sizes]
    stream = b"".join(events) + b"data: unterminated"
    kept = feed(Capture(True, None, 1 << 20), stream, cuts)
    assert len(kept) <= SSE_CAPTURE_BYTES
    assert kept == b"".join(events)[len(b"".join(events)) - len(kept) :]
    if kept:  # it starts at an event
        assert any(kept == b"".join(events[i:]) for i in range(len(events)))
    if len(events[-1]) <= SSE_CAPTURE_BYTES // 2:
        assert kept.endswith(events[-1])


def test_an_incomplete_answer_or_an_unreadable_coding_keeps_nothing() -> None:
    capture = Capture(False, None, 1000)
    capture.feed(b'{"usage": {}}')
    assert capture.finish(False) == b""
    odd = Capture(False, "compress", 1000)
    odd.feed(b"abc")
    assert odd.problem == "encoding" and odd.finish(True) == b""
    corrupt = Capture(True, "br", 1000)
    corrupt.feed(b"not brotli at all, really not" * 10)
    assert corrupt.problem == "encoding" and corrupt.finish(True) == b""
