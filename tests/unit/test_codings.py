"""Streaming decoders of HTTP content codings: any split of any body decodes to the original,
several codings undo in reverse order, and corrupt or unknown codings and bombs are refused."""

from __future__ import annotations

import gzip
import zlib

import brotli
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.dataplane.codings import (
    MAX_RATIO,
    PIECE_BYTES,
    RATIO_FLOOR_BYTES,
    DecodeError,
    codings_of,
    decoder_for,
)
from proxy.mock_upstream import Compression

ENCODERS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": lambda data: zstandard.ZstdCompressor().compress(data),
}


def decode(coding: str, encoded: bytes, cuts: list[int]) -> bytes:
    out: list[bytes] = []
    decoder = decoder_for(coding, out.append)
    assert decoder is not None
    at = 0
    for cut in sorted(c % (len(encoded) + 1) for c in cuts):
        decoder.feed(encoded[at:cut])
        at = cut
    decoder.feed(encoded[at:])
    decoder.finish()
    return b"".join(out)


bodies = st.one_of(
    st.binary(max_size=4000),
    st.builds(lambda t, n: t * n, st.binary(min_size=1, max_size=40), st.integers(1, 5000)),
)


@settings(max_examples=60, deadline=None)
@given(
    coding=st.sampled_from(sorted(ENCODERS)),
    body=bodies,
    cuts=st.lists(st.integers(0, 10**6), max_size=8),
)
def test_any_split_of_any_body_decodes_to_the_original(
    coding: str, body: bytes, cuts: list[int]
) -> None:
    assert decode(coding, ENCODERS[coding](body), cuts) == body


@settings(max_examples=30, deadline=None)
@given(
    codings=st.lists(st.sampled_from(sorted(ENCODERS)), min_size=1, max_size=3),
    pieces=st.lists(st.binary(max_size=500), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 10**6), max_size=6),
)
def test_a_flushed_stream_in_several_codings_decodes_piece_by_piece(
    codings: list[str], pieces: list[bytes], cuts: list[int]
) -> None:
    """The mock upstream's streaming compression (flushed per event), undone in reverse order."""
    compression = Compression(codings)
    out: list[bytes] = []
    decoder = decoder_for(", ".join(codings), out.append)
    assert decoder is not None
    for i, piece in enumerate(pieces):
        decoder.feed(compression.piece(piece))
        # Each flushed piece is readable as soon as it arrives: that is what lets a stream stream.
        assert b"".join(out) == b"".join(pieces[: i + 1])
    decoder.feed(compression.end())
    decoder.finish()
    assert b"".join(out) == b"".join(pieces)


def test_deflate_without_the_zlib_wrapper_and_gzip_members_back_to_back() -> None:
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    body = b"raw deflate " * 100
    assert decode("deflate", raw.compress(body) + raw.flush(), []) == body
    assert decode("gzip", gzip.compress(b"one ") + gzip.compress(b"two"), [5, 30]) == b"one two"


def test_output_comes_in_bounded_pieces() -> None:
    body = b"a" * (20 * PIECE_BYTES)
    for coding, encode in ENCODERS.items():
        out: list[bytes] = []
        decoder = decoder_for(coding, out.append)
        assert decoder is not None
        decoder.feed(encode(body))
        decoder.finish()
        assert b"".join(out) == body
        assert max(map(len, out)) <= 2 * PIECE_BYTES, coding


@pytest.mark.parametrize("coding", ["br", "zstd", "gzip, gzip"])
def test_a_bomb_is_refused_before_it_lands_in_memory(coding: str) -> None:
    """Deflate alone cannot pass the ratio (about 1000:1 at most); brotli, zstd and deflate twice
    can."""
    body = b"\0" * (RATIO_FLOOR_BYTES * 4)
    encoded = body
    for name in codings_of(coding):
        encoded = ENCODERS[name](encoded)
    assert len(body) > MAX_RATIO * len(encoded)  # really a bomb by this module's rule
    seen = 0

    def count(piece: bytes) -> None:
        nonlocal seen
        seen += len(piece)

    decoder = decoder_for(coding, count)
    assert decoder is not None
    with pytest.raises(DecodeError):
        decoder.feed(encoded)
        decoder.finish()
    assert seen <= RATIO_FLOOR_BYTES + 2 * PIECE_BYTES


@pytest.mark.parametrize("coding", sorted(ENCODERS))
def test_corrupt_bodies_raise_decode_error(coding: str) -> None:
    with pytest.raises(DecodeError):
        decode(coding, b"this is not compressed at all, not even a little" * 3, [])


def test_codings_of_a_header() -> None:
    assert codings_of(None) == [] and codings_of("") == [] and codings_of("identity") == []
    assert codings_of(" GZIP , br") == ["gzip", "br"]
    assert decoder_for("identity", lambda _: None) is None
    with pytest.raises(DecodeError):
        decoder_for("compress", lambda _: None)
    with pytest.raises(DecodeError):
        decoder_for("gzip, snappy", lambda _: None)
