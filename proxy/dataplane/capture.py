"""The meter's side copy of an answer (SPEC §10): decoded, bounded, filled as the bytes go by.

The client gets the upstream's bytes as sent; a copy is fed here after each write. A compressed
answer is decoded on the way in (``proxy.dataplane.codings``), piece by piece. What is kept:

- an SSE stream: its last :data:`SSE_CAPTURE_BYTES` cut at event boundaries (the usage rides on
  the last events);
- a JSON body: the whole of it up to ``limit`` bytes (decoded); past that, its last
  :data:`TAIL_BYTES`, where the ``usage`` object of a large answer sits, and ``whole`` is False.

``problem`` names why the copy cannot be read (``encoding``: an unknown coding or a corrupt
body), as a reason of ``access_proxy_unmetered_answers_total``.
"""

from __future__ import annotations

from proxy.dataplane.codings import DecodeError, Decoder, decoder_for

SSE_CAPTURE_BYTES = 64 * 1024
TAIL_BYTES = 64 * 1024
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n")


def _after_first_event(buf: bytearray) -> int:
    ends = [i + len(sep) for sep in _EVENT_ENDS if (i := buf.find(sep)) >= 0]
    return min(ends) if ends else len(buf)


def _after_last_event(buf: bytearray) -> int:
    ends = [i + len(sep) for sep in _EVENT_ENDS if (i := buf.rfind(sep)) >= 0]
    return max(ends) if ends else 0


class Capture:
    """Bounded, decoded copy of one answer."""

    def __init__(self, is_stream: bool, content_encoding: str | None, limit: int) -> None:
        self.is_stream = is_stream
        self.limit = limit
        self.problem: str | None = None
        self.whole = True
        self._parts: list[bytes] = []  # a JSON body while it is whole: joined once, at the end
        self._size = 0
        self._buf = bytearray()
        self._trimmed = False
        self._decoder: Decoder | None = None
        try:
            self._decoder = decoder_for(content_encoding, self._take)
        except DecodeError:
            self.problem = "encoding"

    def feed(self, data: bytes) -> None:
        """Copy a piece of the answer as sent (still encoded)."""
        if self.problem is not None or not data:
            return
        if self._decoder is None:
            self._take(data)
            return
        try:
            self._decoder.feed(data)
        except DecodeError:
            self._fail()

    def _fail(self) -> None:
        self.problem = "encoding"
        self._buf = bytearray()
        self._parts = []
        self._decoder = None

    def _take(self, piece: bytes) -> None:
        if not self.is_stream and self.whole:
            self._parts.append(piece)
            self._size += len(piece)
            if self._size <= self.limit:
                return
            self.whole = False
            self._buf += b"".join(self._parts)[-TAIL_BYTES:]
            self._parts = []
            return
        buf = self._buf
        buf += piece
        if self.is_stream:
            if len(buf) > 2 * SSE_CAPTURE_BYTES:
                del buf[: len(buf) - SSE_CAPTURE_BYTES]
                self._trimmed = True
        elif len(buf) > 2 * TAIL_BYTES:
            del buf[: len(buf) - TAIL_BYTES]

    def finish(self, completed: bool) -> bytes:
        """The copy of a finished answer (``b""`` if it did not complete or cannot be read)."""
        if self._decoder is not None and completed and self.problem is None:
            try:
                self._decoder.finish()
            except DecodeError:
                self._fail()
        if self.problem is not None or not completed:
            return b""
        if not self.is_stream and self.whole:
            return self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        buf = self._buf
        if self.is_stream:
            if len(buf) > SSE_CAPTURE_BYTES:
                del buf[: len(buf) - SSE_CAPTURE_BYTES]
                self._trimmed = True
            if self._trimmed:
                # The front was cut, maybe inside an event: start at the next event.
                del buf[: _after_first_event(buf)]
            del buf[_after_last_event(buf) :]
        elif not self.whole and len(buf) > TAIL_BYTES:
            del buf[: len(buf) - TAIL_BYTES]
        return bytes(buf)
