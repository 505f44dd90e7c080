"""The upstream client (``proxy.dataplane.client``) against raw loopback servers that answer
byte for byte what each test scripts: framing, keep-alive, timeouts, backpressure, and the
answers a broken or hostile upstream could send."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.dataplane.client import (
    Answer,
    BadAnswer,
    FirstByteTimeout,
    IdleTimeout,
    InvalidHeader,
    UpstreamClosed,
    UpstreamPool,
    origin_of,
    request_head,
)

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
DEADLINE = 10.0


@dataclass
class RawServer:
    """A loopback server running ``script(reader, writer, n)`` for the n-th request head it
    reads on each connection; it counts connections and keeps every request head."""

    script: Script
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    closed: int = 0
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.heads.append(head)
                length = _content_length(head)
                if length:
                    await reader.readexactly(length)
                n += 1
                await self.script(reader, writer, n)
                if writer.is_closing():
                    return
        finally:
            self.closed += 1
            writer.close()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Every test on both loops the proxy runs on."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.EventLoopPolicy()  # type: ignore[no-any-return]
    return asyncio.DefaultEventLoopPolicy()


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Script], Awaitable[RawServer]]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> RawServer:
        raw = RawServer(script)
        server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
        servers.append(server)
        raw.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return raw

    yield start
    for server in servers:
        server.close()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool()
    yield p
    await p.close()


def answer_bytes(status: int, body: bytes, *extra: str) -> bytes:
    head = f"HTTP/1.1 {status} OK\r\nContent-Length: {len(body)}\r\n" + "".join(
        f"{h}\r\n" for h in extra
    )
    return head.encode() + b"\r\n" + body


async def ask(
    pool: UpstreamPool,
    url: str,
    method: str = "POST",
    body: bytes = b"{}",
    *,
    first_byte_s: float = 5.0,
    idle_s: float = 5.0,
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),),
) -> Answer:
    return await pool.request(
        url,
        method,
        "/v1/x",
        headers,
        body,
        connect_s=5.0,
        first_byte_s=first_byte_s,
        idle_s=idle_s,
    )


async def poll(check: Callable[[], bool]) -> None:
    end = time.monotonic() + DEADLINE
    while not check():
        assert time.monotonic() < end, "condition not reached before the deadline"
        await asyncio.sleep(0.005)


# --------------------------------------------------------------------------- framing


async def test_keep_alive_reuses_one_connection(raw_server, pool) -> None:
    async def script(r, w, n):
        w.write(answer_bytes(200, f"answer {n}".encode(), "Content-Type: text/plain"))

    server = await raw_server(script)
    for n in (1, 2, 3):
        answer = await ask(pool, server.url)
        assert (answer.status, await answer.read()) == (200, f"answer {n}".encode())
        assert answer.headers["content-type"] == "text/plain"
        answer.release()
    assert server.connections == 1
    head = server.heads[0].decode()
    assert head.startswith("POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:")
    assert "Content-Length: 2\r\n" in head and "Content-Type: application/json\r\n" in head


async def test_connection_close_is_not_reused(raw_server, pool) -> None:
    async def script(r, w, n):
        w.write(answer_bytes(200, b"x", "Connection: close"))

    server = await raw_server(script)
    for _ in range(2):
        answer = await ask(pool, server.url)
        assert await answer.read() == b"x"
        answer.release()
    assert server.connections == 2


async def test_chunked_answer_is_dechunked_and_reused(raw_server, pool) -> None:
    async def script(r, w, n):
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"5\r\nhello\r\n", b"6\r\n world\r\n", b"0\r\n\r\n"):
            w.write(piece)
            await w.drain()

    server = await raw_server(script)
    for _ in range(2):
        answer = await ask(pool, server.url)
        assert answer.content_length is None
        assert await answer.read() == b"hello world"
        answer.release()
    assert server.connections == 1


async def test_body_delimited_by_close(raw_server, pool) -> None:
    async def script(r, w, n):
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        w.close()

    server = await raw_server(script)
    answer = await ask(pool, server.url)
    assert await answer.read() == b"until the end"
    answer.release()
    assert answer.done and not answer.keep_alive


async def test_head_answer_has_no_body_and_is_not_reused(raw_server, pool) -> None:
    async def script(r, w, n):
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")

    server = await raw_server(script)
    answer = await ask(pool, server.url, "HEAD", b"")
    assert answer.content_length == 1234
    assert await answer.read() == b""
    answer.release()
    assert "Content-Length" not in server.heads[0].decode()
    answer = await ask(pool, server.url, "HEAD", b"")
    answer.release()
    assert server.connections == 2


async def test_interim_answers_are_skipped(raw_server, pool) -> None:
    async def script(r, w, n):
        w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n")
        w.write(answer_bytes(201, b"made"))

    server = await raw_server(script)
    answer = await ask(pool, server.url)
    assert (answer.status, answer.reason, await answer.read()) == (201, "OK", b"made")
    assert "link" not in answer.headers


async def test_header_bytes_pass_unchanged(raw_server, pool) -> None:
    async def script(r, w, n):
        w.write(b"HTTP/1.1 200 Fine\r\nX-Odd: caf\xc3\xa9 \xff\r\nContent-Length: 0\r\n\r\n")

    server = await raw_server(script)
    answer = await ask(pool, server.url, headers=(("X-In", "na\udcefve"),))
    assert answer.reason == "Fine"
    assert answer.headers["x-odd"].encode("utf-8", "surrogateescape") == b"caf\xc3\xa9 \xff"
    assert b"X-In: na\xefve\r\n" in server.heads[0]


async def test_line_break_in_a_header_is_refused_before_sending(raw_server, pool) -> None:
    async def script(r, w, n):
        w.write(answer_bytes(200, b""))

    server = await raw_server(script)
    for bad in ("a\r\nX-Injected: 1", "a\nb", "a\rb"):
        with pytest.raises(InvalidHeader):
            await ask(pool, server.url, headers=(("X-In", bad),))
    assert server.heads == []


# --------------------------------------------------------------------------- broken upstreams


@pytest.mark.parametrize(
    ("sent", "error"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", UpstreamClosed),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", UpstreamClosed),
        (b"HTTP/1.1 200 OK\r\nContent-Le", UpstreamClosed),
        (b"", UpstreamClosed),
        (b"NOT HTTP AT ALL\r\n\r\n", BadAnswer),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", BadAnswer),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", BadAnswer),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", BadAnswer),
    ],
    ids=[
        "short-length",
        "cut-chunk",
        "cut-head",
        "nothing",
        "garbage",
        "two-lengths",
        "bad-chunk",
        "unasked-upgrade",
    ],
)
async def test_a_broken_answer_is_an_error(
    raw_server, pool, sent: bytes, error: type[Exception]
) -> None:
    """Closed before the end: ``UpstreamClosed``; framing the parser refuses: ``BadAnswer``.
    Either way the connection is not kept."""

    async def script(r, w, n):
        w.write(sent)
        await w.drain()
        if error is UpstreamClosed:
            w.close()

    server = await raw_server(script)
    with pytest.raises(error):
        answer = await ask(pool, server.url)
        await answer.read()
    assert not pool._idle.get(origin_of(server.url))


async def test_bytes_after_the_answer_drop_the_connection(raw_server, pool) -> None:
    async def script(r, w, n):
        w.write(answer_bytes(200, b"ok") + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra")

    server = await raw_server(script)
    answer = await ask(pool, server.url)
    assert await answer.read() == b"ok"
    answer.release()
    answer = await ask(pool, server.url)
    assert await answer.read() == b"ok"
    assert server.connections == 2


async def test_stale_connection_is_retried_only_for_idempotent_methods(raw_server) -> None:
    async def script(r, w, n):
        if n == 2:  # the second request on a connection: closed unanswered, as at keep-alive end
            w.close()
            return
        w.write(answer_bytes(200, b"ok"))

    server = await raw_server(script)
    for method, retried in (("GET", True), ("POST", False)):
        pool = UpstreamPool()
        try:
            answer = await ask(pool, server.url, method, b"")
            answer.release()
            if retried:
                answer = await ask(pool, server.url, method, b"")
                assert await answer.read() == b"ok"
                answer.release()
            else:
                with pytest.raises(UpstreamClosed):
                    await ask(pool, server.url, method, b"")
        finally:
            await pool.close()
    assert server.connections == 3  # GET: the first and its retry; POST: the first only


# --------------------------------------------------------------------------- timeouts


async def test_first_byte_timeout(raw_server, pool) -> None:
    release = asyncio.Event()

    async def script(r, w, n):
        await release.wait()

    server = await raw_server(script)
    started = time.monotonic()
    with pytest.raises(FirstByteTimeout):
        await ask(pool, server.url, first_byte_s=0.2)
    assert time.monotonic() - started >= 0.2
    release.set()


async def test_an_upstream_that_stops_reading_a_large_body_times_out(pool) -> None:
    """The first-byte clock runs from the write, not from the last byte leaving: an upstream
    that reads the head and then nothing cannot hold the request forever."""
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await release.wait()  # never reads the body: the socket buffers fill, writing pauses
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        with pytest.raises(FirstByteTimeout):
            await ask(pool, url, body=b"x" * (32 << 20), first_byte_s=0.3)
    finally:
        release.set()
        server.close()


async def test_idle_timeout_mid_body(raw_server, pool) -> None:
    release = asyncio.Event()

    async def script(r, w, n):
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await w.drain()
        await release.wait()

    server = await raw_server(script)
    answer = await ask(pool, server.url, first_byte_s=5.0, idle_s=0.2)
    assert await answer.read_some() == b"hello"
    with pytest.raises(IdleTimeout):
        await answer.read_some()
    release.set()


async def test_a_slow_reader_is_not_an_idle_upstream(raw_server, pool) -> None:
    """Reading pauses once a few hundred KiB wait; the time this side does not read is not
    counted as the upstream's silence, and nothing is lost."""
    body = bytes(range(256)) * 16 * 1024  # 4 MiB

    async def script(r, w, n):
        w.write(answer_bytes(200, body))
        await w.drain()

    server = await raw_server(script)
    answer = await ask(pool, server.url, idle_s=0.3)
    await poll(lambda: answer._conn._paused)
    await asyncio.sleep(0.6)  # past idle_s: the time passing is what is under test
    assert await answer.read() == body


# --------------------------------------------------------------------------- the pool


async def test_idle_connections_expire(raw_server) -> None:
    async def script(r, w, n):
        w.write(answer_bytes(200, b"ok"))

    server = await raw_server(script)
    pool = UpstreamPool(keepalive_s=0.1)
    try:
        answer = await ask(pool, server.url)
        answer.release()
        await poll(lambda: server.closed == 1)
        answer = await ask(pool, server.url)
        answer.release()
        assert server.connections == 2
    finally:
        await pool.close()


async def test_cancelled_request_never_goes_back_to_the_pool(raw_server, pool) -> None:
    async def script(r, w, n):
        if server.connections == 1:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
            return
        w.write(answer_bytes(200, b"second"))

    server = await raw_server(script)
    answer = await ask(pool, server.url)
    reading = asyncio.ensure_future(answer.read())
    await poll(lambda: answer.started)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    answer.release()
    answer = await ask(pool, server.url)
    assert await answer.read() == b"second"
    assert server.connections == 2


def test_origin_and_head() -> None:
    o = origin_of("https://api.example.com/openai/")
    assert (o.scheme, o.host, o.port, o.host_header, o.base_path) == (
        "https",
        "api.example.com",
        443,
        "api.example.com",
        "/openai",
    )
    assert origin_of("http://[::1]:8080").host_header == "[::1]:8080"
    assert (
        request_head("GET", "/m", "h", [("A", "b")], None)
        == b"GET /m HTTP/1.1\r\nHost: h\r\nA: b\r\n\r\n"
    )
    with pytest.raises(ValueError):
        origin_of("ftp://example.com")


# --------------------------------------------------------------------------- any split


@st.composite
def answers(draw: st.DrawFn) -> tuple[bytes, bytes, list[int]]:
    """An answer (length-framed or chunked, random chunk sizes) and where its bytes split."""
    body = draw(st.binary(max_size=3000))
    if draw(st.booleans()):
        wire = answer_bytes(200, body)
    else:
        wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        rest = body
        while rest:
            size = draw(st.integers(1, max(1, len(rest))))
            wire += f"{size:x}\r\n".encode() + rest[:size] + b"\r\n"
            rest = rest[size:]
        wire += b"0\r\n\r\n"
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(wire) - 1)), max_size=8, unique=True)))
    return wire, body, cuts


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=answers())
async def test_any_split_of_an_answer_reads_the_same(raw_server, case) -> None:
    wire, body, cuts = case

    async def script(r, w, n):
        last = 0
        for cut in [*cuts, len(wire)]:
            w.write(wire[last:cut])
            await w.drain()
            last = cut

    server = await raw_server(script)
    pool = UpstreamPool()
    try:
        for _ in range(2):  # and the connection is fit for the next answer
            answer = await ask(pool, server.url)
            assert await answer.read() == body
            answer.release()
        assert server.connections == 1
    finally:
        await pool.close()


# --------------------------------------------------------------------------- TLS


async def test_https_upstream_is_verified() -> None:
    """An ``https`` upstream answers over TLS when its certificate chains to a trusted CA for
    the host asked; an untrusted one is refused before a byte of the request is sent."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(answer_bytes(200, b"secret answer"))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)
    url = f"https://localhost:{server.sockets[0].getsockname()[1]}"
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    pool = UpstreamPool(ssl_context=trusting)
    default = UpstreamPool()
    try:
        answer = await ask(pool, url, "GET", b"")
        assert await answer.read() == b"secret answer"
        assert heads[0].startswith(b"GET /v1/x HTTP/1.1\r\nHost: localhost:")
        with pytest.raises(ssl.SSLCertVerificationError):
            await ask(default, url, "GET", b"")
        assert len(heads) == 1
    finally:
        await pool.close()
        await default.close()
        server.close()
