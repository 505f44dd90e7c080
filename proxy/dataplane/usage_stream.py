"""Usage the proxy asks for on a client's behalf (SPEC §10): a chat-completions stream whose
request did not set ``stream_options.include_usage`` gets it set upstream, and the answer is
turned back into the stream the client asked for before it leaves.

With ``include_usage`` the upstream adds ``"usage": null`` to every chunk and one last chunk with
no choices that carries the usage. :class:`UsageHider` drops that chunk and removes the ``usage``
member from the others, cutting the bytes out where that yields exactly the same JSON (checked
by parsing), re-serializing the chunk otherwise; every other byte of the stream goes through as
sent. A compressed stream is decoded on the way (and relayed uncompressed), since its events
cannot be edited in place. The meter reads the usage from the decoded stream before the edit.
"""

from __future__ import annotations

import json
import re
from typing import Any

from proxy import fastjson
from proxy.dataplane.codings import Decoder, Emit, decoder_for

CHAT_COMPLETIONS = "/chat/completions"
_ASK = b',"stream_options":{"include_usage":true}}'
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n")
_LAST_NULL_USAGE = b',"usage":null}'
_NULL_USAGE = re.compile(rb'(,\s*)?"usage"\s*:\s*null(\s*,\s*)?')


def wants_usage_added(method: str, upstream_path: str, doc: Any) -> bool:
    """A chat-completions stream request that did not ask for usage."""
    if method != "POST" or not upstream_path.endswith(CHAT_COMPLETIONS):
        return False
    if not isinstance(doc, dict) or doc.get("stream") is not True:
        return False
    options = doc.get("stream_options")
    return not (isinstance(options, dict) and options.get("include_usage") is True)


def with_usage_asked(
    body: bytes, doc: dict[str, Any], *, reserialize: bool = False
) -> bytes | None:
    """``body`` (whose parsed object is ``doc``) with ``stream_options.include_usage: true``;
    None when it cannot be rewritten (the request then goes as sent, and is counted unmetered).

    Without ``stream_options`` the member is added before the closing brace, so every other byte
    is the client's; otherwise (or with ``reserialize``, for a body that came compressed) the
    object is serialized again with the option set.
    """
    if "stream_options" not in doc and not reserialize:
        end = body.rstrip()
        if end.endswith(b"}") and b"\x00" not in body:  # UTF-8 text, not UTF-16/32
            return end[:-1] + _ASK
        return None
    options = doc.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return None  # the upstream refuses it as the client sent it
    changed = {**doc, "stream_options": {**(options or {}), "include_usage": True}}
    try:
        return json.dumps(changed, ensure_ascii=False, allow_nan=False).encode()
    except ValueError:
        return None


def _without_null_usage(payload: bytes, expected: dict[str, Any]) -> bytes:
    """``payload`` with its top-level ``"usage": null`` member cut out, byte for byte where that
    parses to ``expected``; ``expected`` serialized again otherwise."""
    for match in _NULL_USAGE.finditer(payload):
        start, end = match.span()
        if match.group(1) is not None and match.group(2) is not None:
            end = match.start(2)  # one comma stays between the neighbours
        candidate = payload[:start] + payload[end:]
        try:
            if json.loads(candidate) == expected:
                return candidate
        except ValueError:
            continue
    return json.dumps(expected, ensure_ascii=False, separators=(",", ":")).encode()


def rewrite_event(event: bytes) -> bytes:
    """One SSE event (with its terminating blank line) as the client would have got it."""
    lines = event.splitlines(keepends=True)
    data_at = [i for i, line in enumerate(lines) if line.startswith(b"data:")]
    if not data_at:
        return event
    payloads = [lines[i][5:].removeprefix(b" ").rstrip(b"\r\n") for i in data_at]
    payload = b"\n".join(payloads)
    if b'"usage"' not in payload:
        return event
    if len(data_at) == 1 and payload.endswith(_LAST_NULL_USAGE):
        # The upstream's usual spelling: the top-level object's last member (an unescaped key
        # before the closing brace can only be one of its members). Cut without parsing.
        at = lines[data_at[0]].rfind(_LAST_NULL_USAGE)
        line = lines[data_at[0]]
        lines[data_at[0]] = line[:at] + b"}" + line[at + len(_LAST_NULL_USAGE) :]
        return b"".join(lines)
    try:
        obj = fastjson.loads(payload)
    except ValueError:
        return event
    if not isinstance(obj, dict) or "usage" not in obj:
        return event
    usage = obj.pop("usage")
    if usage is not None and obj.get("choices") == []:
        return b""  # the usage-only chunk the client did not ask for
    if usage is None:
        new_payload = _without_null_usage(payload, obj)
    else:
        new_payload = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    first = data_at[0]
    line = lines[first]
    prefix = line[: len(line) - len(line[5:].removeprefix(b" "))]
    ending = line[len(line.rstrip(b"\r\n")) :] or b"\n"
    lines[first] = prefix + new_payload + ending
    for i in reversed(data_at[1:]):
        del lines[i]
    return b"".join(lines)


def _event_end(buf: bytearray) -> int:
    ends = [i + len(sep) for sep in _EVENT_ENDS if (i := buf.find(sep)) >= 0]
    return min(ends) if ends else -1


class UsageHider:
    """Edits a chat stream event by event (see the module doc). ``side`` gets the decoded
    upstream bytes, before the edit, for the meter. Raises ``DecodeError`` from ``feed`` or
    ``finish`` when the stream cannot be decoded."""

    def __init__(self, content_encoding: str | None, side: Emit) -> None:
        self._side = side
        self._buf = bytearray()
        self._out = bytearray()
        self._decoder: Decoder | None = decoder_for(content_encoding, self._decoded)

    def _decoded(self, piece: bytes) -> None:
        self._side(piece)
        buf = self._buf
        buf += piece
        while (end := _event_end(buf)) >= 0:
            self._out += rewrite_event(bytes(buf[:end]))
            del buf[:end]

    def _take_out(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def feed(self, data: bytes) -> bytes:
        """The bytes to send the client for this piece of the upstream stream (maybe none)."""
        if self._decoder is None:
            self._decoded(data)
        else:
            self._decoder.feed(data)
        return self._take_out()

    def finish(self) -> bytes:
        """What is left at the end of the stream (an unterminated last event, as sent)."""
        if self._decoder is not None:
            self._decoder.finish()
        self._out += self._buf
        self._buf.clear()
        return self._take_out()
