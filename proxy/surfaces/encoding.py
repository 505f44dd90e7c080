"""Compressed request bodies (``Content-Encoding``): decoded to be read, never past the limit.

Every decoder is driven with an output bound, so a decompression bomb is refused as soon as its
output passes ``limits.max_body_bytes``, whatever its ratio; nothing larger is ever allocated.
The decoded bytes are only read: the body forwarded upstream is the one received.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterable

import brotli
import zstandard

from proxy.surfaces.errors import BodyError, invalid, too_large

CODINGS = ("gzip", "deflate", "br", "zstd")
_ALIASES = {"x-gzip": "gzip", "identity": ""}
_MAX_CHAIN = 4
_STEP = 64 * 1024


def codings_of(values: Iterable[str]) -> tuple[str, ...]:
    """The codings of the ``Content-Encoding`` header(s), in the order they were applied."""
    out: list[str] = []
    for value in values:
        for item in value.split(","):
            name = item.strip().lower()
            name = _ALIASES.get(name, name)
            if not name:
                continue
            if name not in CODINGS:
                raise invalid(
                    f"Unsupported Content-Encoding {item.strip()!r}: use identity, "
                    + ", ".join(CODINGS)
                    + "."
                )
            out.append(name)
    if len(out) > _MAX_CHAIN:
        raise invalid("Too many Content-Encoding layers.")
    return tuple(out)


def decode(body: bytes, codings: tuple[str, ...], limit: int) -> bytes:
    """``body`` with ``codings`` undone (last applied first); at most ``limit`` bytes out."""
    data = body
    for coding in reversed(codings):
        try:
            if coding == "gzip":
                data = _zlib(data, 16 + zlib.MAX_WBITS, limit, members=True)
            elif coding == "deflate":
                try:
                    data = _zlib(data, zlib.MAX_WBITS, limit, members=False)
                except zlib.error:  # "deflate" sent raw, without the zlib wrapper
                    data = _zlib(data, -zlib.MAX_WBITS, limit, members=False)
            elif coding == "br":
                data = _brotli(data, limit)
            else:
                data = _zstd(data, limit)
        except BodyError:
            raise
        except (zlib.error, brotli.error, zstandard.ZstdError, ValueError):
            raise invalid(f"The request body is not valid {coding} data.") from None
    return data


def _zlib(data: bytes, wbits: int, limit: int, *, members: bool) -> bytes:
    out = bytearray()
    d = zlib.decompressobj(wbits)
    pending = data
    while True:
        out += d.decompress(pending, limit + 1 - len(out))
        if len(out) > limit:
            raise too_large(limit)
        pending = d.unconsumed_tail
        if d.eof:
            rest = d.unused_data
            if members and rest:  # gzip allows several members back to back
                d = zlib.decompressobj(wbits)
                pending = rest
                continue
            if rest:
                raise invalid("The request body has data after its compressed stream.")
            return bytes(out)
        if not pending:
            raise invalid("The compressed request body ends early.")


def _brotli(data: bytes, limit: int) -> bytes:
    out = bytearray()
    d = brotli.Decompressor()
    out += d.process(data, output_buffer_limit=_STEP)
    while not d.is_finished():
        if len(out) > limit:
            raise too_large(limit)
        chunk = d.process(b"", output_buffer_limit=_STEP)
        if not chunk:
            raise invalid("The compressed request body ends early.")
        out += chunk
    if len(out) > limit:
        raise too_large(limit)
    return bytes(out)


def _zstd(data: bytes, limit: int) -> bytes:
    # 8 MiB is the window every decoder is expected to support; more only for larger limits.
    window = 1 << max(23, min(27, (limit - 1).bit_length()))
    reader = zstandard.ZstdDecompressor(max_window_size=window).stream_reader(
        io.BytesIO(data), read_across_frames=True
    )
    size = 0
    while chunk := reader.read(_STEP):  # first the size, bounded, whatever the frames claim
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
    # Then the bytes, frame by frame, so a frame cut short is noticed.
    out = bytearray()
    pending = data
    while pending:
        d = zstandard.ZstdDecompressor(max_window_size=window).decompressobj()
        out += d.decompress(pending)
        if not d.eof:
            raise invalid("The compressed request body ends early.")
        pending = d.unused_data
    return bytes(out)
