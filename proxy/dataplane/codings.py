"""Streaming decoders for HTTP content codings (``gzip``, ``deflate``, ``br``, ``zstd``), so the
meter can read an answer the upstream compressed while the client gets the bytes as sent.

A decoder is fed the encoded bytes as they arrive and hands the decoded bytes to a callback in
pieces of at most :data:`PIECE_BYTES`, so a small input that expands a lot (a compression bomb)
never lands in memory whole; past :data:`MAX_RATIO` decoded bytes per encoded byte (and a floor
of :data:`RATIO_FLOOR_BYTES`) decoding stops with :class:`DecodeError`. A ``Content-Encoding``
that lists several codings (``gzip, br``) is undone in reverse order of the list.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import IO, Any, Protocol, cast

import brotli
import zstandard

PIECE_BYTES = 64 * 1024
MAX_RATIO = 2000
RATIO_FLOOR_BYTES = 4 * 1024 * 1024

Emit = Callable[[bytes], None]


class DecodeError(Exception):
    """The body cannot be decoded: unknown coding, corrupt data or too large an expansion."""


class Decoder(Protocol):
    def feed(self, data: bytes) -> None: ...

    def finish(self) -> None: ...


class _Zlib:
    """``gzip`` (also several members back to back) and ``deflate`` (zlib-wrapped or raw)."""

    def __init__(self, emit: Emit, wbits: int) -> None:
        self._emit = emit
        self._wbits = wbits
        self._raw_fallback = wbits == zlib.MAX_WBITS
        self._d = zlib.decompressobj(wbits)
        self._started = False

    def feed(self, data: bytes) -> None:
        while data:
            try:
                out = self._d.decompress(data, PIECE_BYTES)
            except zlib.error as exc:
                if self._raw_fallback and not self._started:
                    # Some servers send "deflate" without the zlib wrapper.
                    self._raw_fallback = False
                    self._wbits = -zlib.MAX_WBITS
                    self._d = zlib.decompressobj(self._wbits)
                    continue
                raise DecodeError(f"corrupt compressed body: {exc}") from None
            self._started = True
            if out:
                self._emit(out)
            data = self._d.unconsumed_tail
            if self._d.eof:
                rest = self._d.unused_data
                if not rest.strip(b"\x00"):
                    return
                self._d = zlib.decompressobj(self._wbits)  # the next gzip member
                data = rest

    def finish(self) -> None:
        out = self._d.flush()
        if out:
            self._emit(out)


class _Brotli:
    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self._d = brotli.Decompressor()

    def feed(self, data: bytes) -> None:
        # The output of one call stops near the limit; calls without input drain the rest.
        try:
            out = self._d.process(data, output_buffer_limit=PIECE_BYTES)
            while out:
                self._emit(out)
                if self._d.is_finished():
                    return
                out = self._d.process(b"", output_buffer_limit=PIECE_BYTES)
        except brotli.error as exc:
            raise DecodeError(f"corrupt brotli body: {exc}") from None

    def finish(self) -> None:
        pass


class _Sink:
    """The writer zstandard's stream writer hands decoded pieces to (as they come, unbuffered)."""

    def __init__(self, emit: Emit) -> None:
        self.emit = emit

    def write(self, data: Any) -> int:
        self.emit(bytes(data))
        return len(data)


class _Zstd:
    def __init__(self, emit: Emit) -> None:
        sink = cast(IO[bytes], _Sink(emit))
        self._w = zstandard.ZstdDecompressor().stream_writer(sink, write_size=PIECE_BYTES)

    def feed(self, data: bytes) -> None:
        try:
            self._w.write(data)
        except zstandard.ZstdError as exc:
            raise DecodeError(f"corrupt zstd body: {exc}") from None

    def finish(self) -> None:
        pass


class _Chain:
    """Several decoders in a row (``codings`` in the order they are undone), with the expansion
    bound on the final output."""

    def __init__(self, codings: list[str], emit: Emit) -> None:
        self._encoded = 0
        self._decoded = 0
        self._emit = emit
        sink: Emit = self._bounded
        stages: list[Decoder] = []
        for coding in reversed(codings):  # built from the output end
            stage = _one(coding, sink)
            stages.append(stage)
            sink = stage.feed
        self._stages = stages[::-1]

    def _bounded(self, piece: bytes) -> None:
        self._decoded += len(piece)
        if self._decoded > RATIO_FLOOR_BYTES and self._decoded > MAX_RATIO * self._encoded:
            raise DecodeError("the compressed body expands too far")
        self._emit(piece)

    def feed(self, data: bytes) -> None:
        self._encoded += len(data)
        self._stages[0].feed(data)

    def finish(self) -> None:
        for stage in self._stages:
            stage.finish()


def _one(coding: str, emit: Emit) -> Decoder:
    if coding in ("gzip", "x-gzip"):
        return _Zlib(emit, 16 + zlib.MAX_WBITS)
    if coding == "deflate":
        return _Zlib(emit, zlib.MAX_WBITS)
    if coding == "br":
        return _Brotli(emit)
    if coding == "zstd":
        return _Zstd(emit)
    raise DecodeError(f"unsupported content coding {coding!r}")


def codings_of(content_encoding: str | None) -> list[str]:
    """The codings of a ``Content-Encoding`` value in the order applied, ``identity`` left out."""
    if not content_encoding:
        return []
    names = (part.strip().lower() for part in content_encoding.split(","))
    return [name for name in names if name and name != "identity"]


def decoder_for(content_encoding: str | None, emit: Emit) -> Decoder | None:
    """A decoder for ``content_encoding`` that passes decoded pieces to ``emit``; None for an
    unencoded body. Raises :class:`DecodeError` for a coding it does not know."""
    codings = codings_of(content_encoding)
    if not codings:
        return None
    return _Chain(codings[::-1], emit)
