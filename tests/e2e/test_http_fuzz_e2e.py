"""Generated malformed HTTP over raw sockets to a real ``serve`` (SPEC §3.5), property-based.

Requests are built from parts — request lines (methods, targets, versions, line endings), header
injection (CR/LF/NUL in values, folded lines, bad names), framing (Content-Length and
Transfer-Encoding variants, both, duplicates), chunk sizes and bodies — from a caller whose key and
grant would let a well-formed request through. For every one:

- no answer is a 5xx, and the proxy process stays up;
- every request head that reaches the upstream is well-formed HTTP/1.1 with the upstream's
  credential, and a request built with a defect that makes it malformed never reaches it at all;

and afterwards a normal request succeeds and nothing was logged as a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.e2e.conftest import UPSTREAM_SECRET, Seeder, ServeProcess, Stack, chat_body
from tests.e2e.rawupstream import RawUpstream, raw_upstream

MODEL = "gpt-5.6-sol"
CLIENT_TIMEOUT_S = 0.3


@dataclass
class Target:
    serve: ServeProcess
    upstream: RawUpstream
    key: str


@pytest.fixture(scope="module")
def target(stack: Stack) -> Iterator[Target]:
    async def seeded() -> str:
        seed = Seeder(stack.redis_url)
        try:
            tenant = await seed.tenant()
            await seed.grant(f"workspace:{tenant.workspace}")
            return tenant.key
        finally:
            await seed.close()

    key = asyncio.run(seeded())
    with raw_upstream() as upstream:
        serve = stack.start_serve(
            "http-fuzz",
            overrides={
                "upstreams": {"models": {"url": upstream.url}},
                "limits": {
                    "max_body_bytes": 65536,
                    "client_header_timeout_s": CLIENT_TIMEOUT_S,
                    "client_body_timeout_s": CLIENT_TIMEOUT_S,
                },
                "rate_limits": {"enabled": False},
            },
        )
        try:
            yield Target(serve, upstream, key)
        finally:
            assert serve.stop() == 0, serve.log()


# ---------------------------------------------------------------------------- generation


@dataclass
class Built:
    raw: bytes
    malformed: list[str]  # the defects that make this request malformed HTTP


@st.composite
def requests(draw: st.DrawFn, key: str) -> Built:
    defects: list[str] = []

    def pick(name: str, good: list[str], bad: list[str]) -> str:
        # Mostly good parts, so that many requests carry one defect or none.
        if draw(st.integers(0, 9)) < 8:
            return draw(st.sampled_from(good))
        value = draw(st.sampled_from(bad))
        defects.append(f"{name} {value!r}")
        return value

    method = pick("method", ["POST", "POST", "GET", "PUT"], ["P OST", "GET\x00", "", "PO\rST"])
    path = pick(
        "target",
        ["/v1/chat/completions", "/v1/chat/completions?x=1", "/v1/models/" + MODEL],
        ["/v1/chat completions", "/v1/\x7fx", "/v1/\x00", "/v1/\rx"],
    )
    version = pick(
        "version",
        ["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"],
        ["", "HTTP/2.0", "http/1.1", "HTTP/1.10", "HTTP/0.9", "HTTP/1", "HTTP/1.1 x"],
    )
    eol = pick("line end", ["\r\n"] * 6, ["\n", "\r"])
    line = f"{method} {path} {version}".rstrip(" ") if version else f"{method} {path}"

    body = json.dumps(chat_body(MODEL)).encode()
    headers: list[tuple[str, str]] = []
    if version != "HTTP/1.0" or draw(st.booleans()):
        headers.append(("Host", "proxy.test"))
    headers.append(("Authorization", f"Bearer {key}"))
    headers.append(("Content-Type", "application/json"))
    for _ in range(draw(st.integers(0, 2))):
        name, value = pick_header(draw, defects)
        headers.append((name, value))

    framing = draw(
        st.sampled_from(
            [
                "length",
                "length",
                "chunked",
                "none",
                "both",
                "two-lengths",
                "bad-length",
                "wrong-length",
            ]
        )
    )
    payload = body
    if framing == "length":
        headers.append(("Content-Length", str(len(body))))
    elif framing == "none":
        payload = b""
    elif framing == "both":
        headers += [("Content-Length", str(len(body))), ("Transfer-Encoding", "chunked")]
        defects.append("both Content-Length and Transfer-Encoding")
    elif framing == "two-lengths":
        other = draw(st.sampled_from([len(body), len(body) - 1]))
        headers += [("Content-Length", str(len(body))), ("Content-Length", str(other))]
        defects.append("two Content-Lengths")
    elif framing == "bad-length":
        bad = draw(
            st.sampled_from(
                [
                    "-1",
                    f"+{len(body)}",
                    "0x10",
                    "1e3",
                    f"{len(body)}, {len(body)}",
                    "99999999999999999999999",
                    " ",
                    f"{len(body)} x",
                ]
            )
        )
        headers.append(("Content-Length", bad))
        defects.append(f"Content-Length {bad!r}")
    elif framing == "wrong-length":
        # Valid framing that disagrees with the bytes sent: a short body waits (and times out);
        # a long one leaves bytes that are parsed as the next request.
        headers.append(("Content-Length", str(len(body) + draw(st.sampled_from([-5, 7, 1000])))))
    if framing in ("chunked", "both"):
        te = draw(
            st.sampled_from(
                [
                    "chunked",
                    "chunked",
                    "Chunked",
                    "gzip, chunked",
                    "chunked, gzip",
                    "chunked\x0b",
                    "identity",
                ]
            )
        )
        if framing == "chunked":
            headers.append(("Transfer-Encoding", te))
            if te not in ("chunked", "Chunked", "gzip, chunked"):
                defects.append(f"Transfer-Encoding {te!r}")
            if version == "HTTP/1.0":
                defects.append("HTTP/1.0 with Transfer-Encoding")
        payload = chunked(draw, body, defects)
    if draw(st.integers(0, 4)) > 0:
        headers.append(("Connection", "close"))
    head = (
        line
        + eol
        + "".join(f"{n}: {v}{eol}" if n != " fold" else f" {v}{eol}" for n, v in headers)
        + eol
    )
    return Built(head.encode("latin-1") + payload, defects)


def pick_header(draw: st.DrawFn, defects: list[str]) -> tuple[str, str]:
    # A CRLF inside a value just starts another (well-formed) header line: not a defect.
    good = [
        ("X-Split", "a\r\nX-Second: 1"),
        ("X-Trace", "abc"),
        ("Accept", "*/*"),
        ("X-Long", "v" * 2000),
        ("Upgrade", "h2c"),
        ("Expect", "100-continue"),
        ("X-Empty", ""),
    ]
    bad = [
        ("X-Inject", "a\nX-Injected: 1"),
        ("X-Nul", "a\x00b"),
        ("X Space", "a"),
        ("X-Colon ", "a"),
        ("", "a"),
        (" fold", "continued"),
        ("X-Bell", "a\x07b"),
        ("X-Huge", "h" * 100_000),
    ]
    name, value = draw(st.sampled_from(good + bad))
    if (name, value) in bad:
        defects.append(f"header {name!r}")
    return name, value


def chunked(draw: st.DrawFn, body: bytes, defects: list[str]) -> bytes:
    size = f"{len(body):x}"
    kind = draw(
        st.sampled_from(
            [
                "ok",
                "ok",
                "ext",
                "trailer",
                "bad-hex",
                "negative",
                "overflow",
                "no-crlf",
                "lf-only",
                "no-last",
                "size-too-small",
            ]
        )
    )
    if kind == "ok":
        return f"{size}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    if kind == "ext":
        return f"{size};name=value\r\n".encode() + body + b"\r\n0\r\n\r\n"
    if kind == "trailer":
        return f"{size}\r\n".encode() + body + b"\r\n0\r\nX-Trailer: t\r\n\r\n"
    defects.append(f"chunk {kind}")
    if kind == "bad-hex":
        return b"zz\r\n" + body + b"\r\n0\r\n\r\n"
    if kind == "negative":
        return b"-5\r\n" + body + b"\r\n0\r\n\r\n"
    if kind == "overflow":
        return b"ffffffffffffffffffffff\r\n" + body + b"\r\n0\r\n\r\n"
    if kind == "no-crlf":
        return f"{size}\r\n".encode() + body + b"XX0\r\n\r\n"
    if kind == "lf-only":
        return f"{size}\n".encode() + body + b"\n0\n\n"
    if kind == "size-too-small":
        return f"{len(body) - 3:x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    return f"{size}\r\n".encode() + body + b"\r\n"  # no last chunk: waits, then times out


# ---------------------------------------------------------------------------- checking

_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")
_REQUEST_LINE = re.compile(rb"[A-Z]+ /[!-~]* HTTP/1\.1")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def exchange(port: int, raw: bytes) -> list[int]:
    """Send ``raw``; the statuses of every response read until the proxy closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # The proxy may close before reading it all (e.g. a refused huge header).
        with contextlib.suppress(OSError):
            sock.sendall(raw)
        data = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            sock.settimeout(0.3 if _STATUS.search(data) else 5)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break  # answered, and the connection is kept alive
            except OSError:
                break
            if not chunk:
                break
            data += chunk
    return [int(m.group(1)) for m in _STATUS.finditer(data)]


def well_formed(head: bytes) -> str | None:
    """Why a head received by the upstream is not clean HTTP/1.1, or None."""
    lines = head.split(b"\r\n")
    if not _REQUEST_LINE.fullmatch(lines[0]):
        return f"request line {lines[0]!r}"
    names = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            return f"header line {line!r}"
        if any((c < 0x20 and c != 0x09) or c == 0x7F for c in value):
            return f"control character in {line!r}"
        names.append(name.lower())
    if names.count(b"content-length") > 1 or (
        b"content-length" in names and b"transfer-encoding" in names
    ):
        return f"ambiguous framing {names}"
    if f"authorization: Bearer {UPSTREAM_SECRET}".encode().lower() not in head.lower():
        return "no upstream credential"
    return None


def test_generated_malformed_http_never_gets_a_5xx_or_reaches_the_upstream(target: Target) -> None:
    port = target.serve.data_port
    seen: dict[int, int] = {}
    forwarded = 0

    key = target.key.encode()
    body = json.dumps(chat_body(MODEL)).encode()

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(requests(target.key))
    # The two shapes the issue found forwarded, always tried.
    @example(
        Built(
            b"GET /v1/models/" + MODEL.encode() + b"\r\nAuthorization: Bearer " + key + b"\r\n\r\n",
            ["no HTTP version"],
        )
    )
    @example(
        Built(
            b"POST /v1/chat/completions HTTP/1.0\r\nAuthorization: Bearer " + key + b"\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            + f"{len(body):x}\r\n".encode()
            + body
            + b"\r\n0\r\n\r\n",
            ["HTTP/1.0 with Transfer-Encoding"],
        )
    )
    def one(built: Built) -> None:
        nonlocal forwarded
        before = len(target.upstream.recorded())
        statuses = exchange(port, built.raw)
        for status in statuses:
            seen[status] = seen.get(status, 0) + 1
        assert all(s < 500 for s in statuses), (statuses, built.raw[:400])
        assert target.serve.proc.poll() is None, target.serve.log()
        new = target.upstream.recorded()[before:]
        forwarded += len(new)
        for head in new:
            assert well_formed(head) is None, (well_formed(head), head, built.raw[:400])
        if built.malformed:
            assert new == [], (built.malformed, new, built.raw[:400])

    started = time.monotonic()
    one()
    print(
        f"\nstatuses {sorted(seen.items())}, {forwarded} forwarded, "
        f"in {time.monotonic() - started:.1f} s"
    )
    # Afterwards a normal request succeeds, and nothing was logged as a traceback.
    raw = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {target.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body
    assert exchange(port, raw) == [200]
    assert "Traceback" not in target.serve.log(), target.serve.log()
