"""Where a request names its models (SPEC §3.3), read by ``proxy.surfaces``: every place, every
spelling, every encoding; two names, unreadable bodies, deep JSON and bombs refused."""

from __future__ import annotations

import gzip
import json
import time
import zlib
from typing import Any

import brotli
import pytest
import zstandard
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from proxy.modelnames import normalize
from proxy.surfaces import BodyError, Named, named_models
from proxy.surfaces.encoding import decode
from proxy.surfaces.endpoints import endpoint_of

LIMIT = 1 << 20
CHAT = "/v1/chat/completions"
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

names = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=24,
).filter(lambda s: normalize(s) != "")
ascii_names = st.from_regex(r"[a-z][a-z0-9.\-]{0,20}", fullmatch=True)


def read(
    body: bytes = b"",
    *,
    path: str = CHAT,
    query: str = "",
    ctype: str | None = "application/json",
    encodings: tuple[str, ...] = (),
    method: str = "POST",
    limit: int = LIMIT,
) -> Named:
    return named_models(method, path, query, [ctype] if ctype else [], encodings, body, limit)


def refused(code: str = "invalid_request", **kw: Any) -> BodyError:
    with pytest.raises(BodyError) as caught:
        read(**kw)
    assert caught.value.code == code, caught.value.message
    return caught.value


def compress(data: bytes, coding: str) -> bytes:
    if coding == "gzip":
        return gzip.compress(data)
    if coding == "deflate":
        return zlib.compress(data)
    if coding == "br":
        return bytes(brotli.compress(data))
    return zstandard.ZstdCompressor().compress(data)


def multipart(fields: list[tuple[str, bytes]], boundary: str = "bNd") -> tuple[bytes, str]:
    out = b""
    for name, value in fields:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'.encode()
        if name == "file":
            out += b'; filename="in.jsonl"\r\nContent-Type: application/jsonl'
        out += b"\r\n\r\n" + value + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


# --------------------------------------------------------------------------- every place


@SETTINGS
@given(
    name=names,
    ctype=st.sampled_from(
        [None, "application/json", "text/plain", "application/octet-stream", "x/y; charset=a"]
    ),
    codings=st.lists(st.sampled_from(["gzip", "deflate", "br", "zstd", "identity"]), max_size=3),
)
def test_a_json_object_names_its_model_whatever_the_content_type_and_encoding(
    name: str, ctype: str | None, codings: list[str]
) -> None:
    body = json.dumps({"model": name, "messages": []}).encode()
    for coding in codings:
        body = compress(body, coding) if coding != "identity" else body
    named = read(body, ctype=ctype, encodings=(", ".join(codings),) if codings else ())
    assert [normalize(m) for m in named.models] == [normalize(name)]
    assert isinstance(named.doc, dict)


@SETTINGS
@given(name=names, place=st.sampled_from(["multipart", "form", "query", "path", "session"]))
def test_every_other_place_is_read(name: str, place: str) -> None:
    from urllib.parse import quote

    if place == "multipart":
        body, ctype = multipart([("prompt", b"hi"), ("model", name.encode())])
        named = read(body, path="/v1/audio/transcriptions", ctype=ctype)
    elif place == "form":
        body = ("a=1&model=" + quote(name, safe="")).encode()
        named = read(body, ctype="application/x-www-form-urlencoded", path="/v1/x")
    elif place == "query":
        named = read(path="/v1/realtime", query="model=" + quote(name, safe=""), method="GET")
    elif place == "path":
        assume("/" not in name and name not in (".", ".."))
        named = read(path="/v1/models/" + quote(name, safe=""), method="GET")
    else:
        body = json.dumps({"session": {"type": "realtime", "model": name}}).encode()
        named = read(body, path="/v1/realtime/client_secrets")
    assert [normalize(m) for m in named.models] == [normalize(name)]


@SETTINGS
@given(a=ascii_names, b=ascii_names, places=st.sampled_from(["json+query", "form", "multipart"]))
def test_two_different_names_are_refused(a: str, b: str, places: str) -> None:
    if normalize(a) == normalize(b):
        return
    if places == "json+query":
        refused(body=json.dumps({"model": a}).encode(), query=f"model={b}")
    elif places == "form":
        refused(body=f"model={a}&x=1;model={b}".encode(), ctype="application/x-www-form-urlencoded")
    else:
        body, ctype = multipart([("model", a.encode()), ("model", b.encode())])
        refused(body=body, ctype=ctype, path="/v1/audio/transcriptions")


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"gpt-4o","model":"gpt-5.6-sol"}',
        b'{"model":"gpt-4o","\\u006dodel":"gpt-5.6-sol"}',
        b'{"mod\\u0065l":"gpt-5.6-sol","model":"gpt-4o"}',
        b'{"session":{"model":"gpt-5.6-sol"},"session":{}}',
        b'{"session":{"model":"gpt-5.6-sol"},"sessio\\u006e":{}}',
    ],
)
def test_duplicate_keys_that_could_hide_a_model_are_refused(body: bytes) -> None:
    refused(body=body, path="/v1/anything")


def test_the_same_model_twice_in_different_spellings_is_one_model() -> None:
    named = read(json.dumps({"model": "GPT-5.6-sol "}).encode(), query="model=gpt-5.6-sol")
    assert [normalize(m) for m in named.models] == ["gpt-5.6-sol"]


# --------------------------------------------------------------------------- unreadable bodies


@pytest.mark.parametrize("depth", [65, 100, 1000, 100_000])
def test_json_deeper_than_64_is_400_never_a_crash(depth: int) -> None:
    for opener, closer in ((b"[", b"]"), (b'{"a":', b"}")):
        body = b'{"model":"m","x":' + opener * (depth - 1) + b"1" + closer * (depth - 1) + b"}"
        err = refused(body=body)
        assert "nested deeper than 64" in err.message


def test_json_of_depth_64_is_read() -> None:
    body = b'{"model":"m","x":' + b"[" * 63 + b"1" + b"]" * 63 + b"}"
    assert read(body).models == ("m",)


@pytest.mark.parametrize(
    "body,ctype",
    [
        (b'{"model": "gpt-5.6-sol",}', "text/plain"),
        (b'{"model":"gpt-4o"}{"model":"gpt-5.6-sol"}', None),
        (b"model=gpt-5.6-sol", "text/plain"),
        (b'{"model": "x"', "application/json"),
        (b"\xff\xfe{", None),
    ],
)
def test_a_body_that_cannot_be_read_is_refused(body: bytes, ctype: str | None) -> None:
    refused(body=body, ctype=ctype, path="/v1/anything")


def test_malformed_multipart_is_refused() -> None:
    body, ctype = multipart([("model", b"gpt-5.6-sol")])
    refused(body=body[:-10], ctype=ctype)  # no closing boundary
    refused(body=body, ctype="multipart/form-data")  # no boundary
    refused(body=body, ctype="multipart/form-data; boundary=bNd; boundary=other")
    cte = body.replace(b'name="model"', b'name="model"\r\nContent-Transfer-Encoding: base64')
    refused(body=cte, ctype=ctype)
    twice = body.replace(b'name="model"', b'name="model"; name="prompt"')
    refused(body=twice, ctype=ctype)


def test_multipart_names_in_other_spellings_are_model_fields() -> None:
    body, ctype = multipart([("x", b"1")])
    for disposition in (b"name=model", b'NAME=" Model "', b"name*=utf-8''mod%65l"):
        raw = body.replace(b'name="x"', disposition).replace(b"\r\n\r\n1", b"\r\n\r\ngpt-5.6-sol")
        assert read(raw, ctype=ctype).models == ("gpt-5.6-sol",), disposition


def test_unknown_content_encoding_is_refused_and_identity_is_not() -> None:
    body = json.dumps({"model": "m"}).encode()
    refused(body=body, encodings=("compress",))
    refused(body=body, encodings=("gzip",))  # claims gzip, is not
    assert read(body, encodings=("identity",)).models == ("m",)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_a_decompression_bomb_is_refused_early(coding: str) -> None:
    bomb = compress(b"{" + b" " * (64 << 20) + b"}", coding)  # 64 MiB of JSON whitespace
    started = time.monotonic()
    refused("request_too_large", body=bomb, encodings=(coding,), limit=LIMIT)
    assert time.monotonic() - started < 5, "decoded past the limit"


def test_decoded_size_counts_against_the_limit() -> None:
    body = json.dumps({"model": "m", "pad": "x" * 5000}).encode()
    named = read(gzip.compress(body), encodings=("gzip",), limit=len(body))
    assert named.models == ("m",) and named.encoded and named.decoded == body  # the classifier's
    refused("request_too_large", body=gzip.compress(body), encodings=("gzip",), limit=4000)


# --------------------------------------------------------------------------- endpoints


def test_an_endpoint_that_needs_a_model_refuses_a_body_without_one() -> None:
    for path in (CHAT, "/v1/embeddings", "/v1/responses", "/v1//chat/./completions/"):
        refused(body=b'{"messages": []}', path=path)
    assert read(b'{"input": "x"}', path="/v1/moderations").models == ()
    assert read(b"", path="/v1/batches/b1/cancel").models == ()


@pytest.mark.parametrize(
    "path", ["/v1/batches", "/v1//batches", "/v1/./batches/", "/v1/Batches", "/v1/x/../batches"]
)
def test_batches_are_recognised_however_the_path_is_spelled(path: str) -> None:
    named = read(b'{"input_file_id": "file-1", "endpoint": "/v1/chat/completions"}', path=path)
    assert named.input_file_id == "file-1"
    refused(body=b'{"endpoint": "/v1/chat/completions"}', path=path)


def test_model_path_is_percent_decoded() -> None:
    assert endpoint_of("GET", "/v1/models/gpt%2D5.6-sol")[1] == "gpt-5.6-sol"
    assert endpoint_of("GET", "/v1//models/gpt-5.6-sol")[1] == "gpt-5.6-sol"
    assert endpoint_of("GET", "/v1//models")[0].kind == "model_list"


# --------------------------------------------------------------------------- batch files


def batch_lines(models: list[str | None]) -> bytes:
    lines = []
    for i, m in enumerate(models):
        body: dict[str, Any] = {"messages": []}
        if m is not None:
            body["model"] = m
        lines.append(json.dumps({"custom_id": str(i), "method": "POST", "url": CHAT, "body": body}))
    return "\n".join(lines).encode() + b"\n"


@SETTINGS
@given(models=st.lists(ascii_names, min_size=1, max_size=20), purpose_first=st.booleans())
def test_a_batch_upload_names_every_line_model(models: list[str], purpose_first: bool) -> None:
    fields = [("purpose", b"batch"), ("file", batch_lines(list(models)))]
    body, ctype = multipart(fields if purpose_first else fields[::-1])
    named = read(body, path="/v1/files", ctype=ctype)
    assert named.batch_file
    assert {normalize(m) for m in named.models} == {normalize(m) for m in models}


def test_a_batch_line_without_a_model_or_with_duplicate_keys_is_refused() -> None:
    body, ctype = multipart([("purpose", b"batch"), ("file", batch_lines(["a", None]))])
    assert "line 2" in refused(body=body, path="/v1/files", ctype=ctype).message
    dup = b'{"url":"/v1/chat/completions","body":{"model":"a"},"body":{"model":"b"}}\n'
    body, ctype = multipart([("file", dup), ("purpose", b"batch")])
    refused(body=body, path="/v1/files", ctype=ctype)


def test_a_file_for_another_purpose_is_not_scanned() -> None:
    body, ctype = multipart([("purpose", b"fine-tune"), ("file", b"not json at all\n")])
    named = read(body, path="/v1/files", ctype=ctype)
    assert not named.batch_file and named.models == ()


def test_decode_undoes_a_chain_of_codings() -> None:
    data = b'{"model":"m"}'
    assert decode(gzip.compress(bytes(brotli.compress(data))), ("br", "gzip"), 100) == data
