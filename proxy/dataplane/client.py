"""The upstream HTTP/1.1 client: keep-alive connections pooled per origin, each an asyncio
protocol whose answers are parsed by ``httptools`` (llhttp, the parser of Node.js).

Why not aiohttp's ``ClientSession``: a profile of the proxy at 32 connections put a quarter of its
CPU in the client's request machinery (request and response objects, payload registry, auto
headers, tracing hooks, stream readers), none of which a reverse proxy uses. This client does only
what forwarding needs: the request written in one go, the answer's head parsed, its body
(de-chunked by the parser, otherwise as sent: no decompression) handed over as it arrives, with
backpressure, and the connection kept for the next request when the answer ended cleanly. No
cookies, no redirects, no headers of its own but ``Host`` and ``Content-Length``.

Timeouts (SPEC §3.5), one timer per connection:

- connect (``connect_s``): name resolution and TCP/TLS connect → :class:`ConnectTimeout`;
- first byte (``first_byte_s``): from the request being written until the upstream's first
  byte (so an upstream that stops reading a large body times out too) →
  :class:`FirstByteTimeout`;
- idle (``idle_s``): silence from the upstream after its first byte, counted only while this
  side is reading (not while reading is paused because the client is slow) →
  :class:`IdleTimeout`.

All three are ``TimeoutError``; an upstream that refuses, resets, closes early or breaks HTTP
framing raises a ``ConnectionError`` (:class:`UpstreamClosed`, :class:`BadAnswer`), so callers
map the two families to 504 and 502. A reused connection that the upstream closed before
answering is retried once on a new connection for an idempotent method (the upstream may close an
idle connection just as a request is written); never for a POST, which may have run.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

# Buffered body bytes at which reading from the upstream pauses, and resumes.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
MAX_IDLE_PER_ORIGIN = 256

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


class ConnectTimeout(TimeoutError):
    """The connection to the upstream was not made within ``connect_s``."""


class FirstByteTimeout(TimeoutError):
    """The upstream sent nothing within ``first_byte_s`` of the request."""


class IdleTimeout(TimeoutError):
    """The upstream went silent for ``idle_s`` in the middle of its answer."""


class UpstreamClosed(ConnectionError):
    """The upstream closed or reset the connection before its answer ended."""


class BadAnswer(ConnectionError):
    """The upstream's bytes are not an HTTP/1.1 answer the parser accepts."""


class InvalidHeader(ValueError):
    """A request header would break the request's framing (a line break in a value)."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an upstream's connections go, and what its requests say."""

    scheme: str
    host: str
    port: int
    host_header: str
    base_path: str  # the upstream URL's own path, put in front of every request target


@functools.lru_cache(maxsize=256)
def origin_of(url: str) -> Origin:
    """The origin of an upstream base URL (``http[s]://host[:port][/base]``)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    host = parts.hostname
    port = parts.port or _DEFAULT_PORTS[scheme]
    shown = f"[{host}]" if ":" in host else host
    if port != _DEFAULT_PORTS[scheme]:
        shown = f"{shown}:{port}"
    return Origin(scheme, host, port, shown, parts.path.rstrip("/"))


def request_head(
    method: str, target: str, host: str, headers: Iterable[tuple[str, str]], length: int | None
) -> bytes:
    """The request line and headers, encoded as the server decoded them (UTF-8, undecodable
    bytes kept as they came). Raises :class:`InvalidHeader` on a line break in any part."""
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers)
    if length is not None:
        lines.append(f"Content-Length: {length}\r\n")
    lines.append("\r\n")
    text = "".join(lines)
    breaks = len(lines) + 1
    if text.count("\n") != breaks or text.count("\r") != breaks:
        raise InvalidHeader("a request header holds a line break")
    return text.encode("utf-8", "surrogateescape")


class Answer:
    """One upstream answer: its head (``status``, ``reason``, ``headers``), then its body piece
    by piece. Filled by its connection's parser callbacks; read by the caller."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_error",
        "_head",
        "_raw",
        "_released",
        "_waiter",
        "content_length",
        "done",
        "head_only",
        "headers",
        "keep_alive",
        "reason",
        "started",
        "status",
    )

    def __init__(self, conn: Connection, head_only: bool) -> None:
        self._conn = conn
        self._head: asyncio.Future[None] = conn.loop.create_future()
        self._raw: list[tuple[str, str]] = []
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._released = False
        self.head_only = head_only
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        self.content_length: int | None = None
        self.started = False  # a byte of it arrived
        self.done = False  # it ended cleanly
        self.keep_alive = False

    # -------------------------------------------------------------- the connection's side

    def head_arrived(self, status: int) -> None:
        self.status = status
        self.headers = CIMultiDictProxy(CIMultiDict(self._raw))
        length = self.headers.get("content-length")
        if length is not None and length.isdigit():
            self.content_length = int(length)
        if self.head_only:
            self.done = True  # a HEAD answer has no body, whatever its headers say
        if not self._head.done():
            self._head.set_result(None)

    def body_arrived(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        self._wake()
        if self._buffered >= HIGH_WATER:
            self._conn.pause_reading()

    def ended(self, keep_alive: bool) -> None:
        self.done = True
        self.keep_alive = keep_alive and not self.head_only
        self._wake()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.done or self._error is not None:
            return
        if exc is None and self._head.done() and self._delimited_by_close():
            self.done = True  # a body without length or chunks ends when the connection does
            self._wake()
            return
        lost = UpstreamClosed("the upstream closed the connection before its answer ended")
        lost.__cause__ = exc
        self.fail(lost)

    def _delimited_by_close(self) -> bool:
        coding = self.headers.get("transfer-encoding", "")
        return self.content_length is None and "chunked" not in coding.lower()

    def fail(self, exc: BaseException) -> None:
        if self.done or self._error is not None:
            return
        self._error = exc
        self.keep_alive = False
        if not self._head.done():
            self._head.set_exception(exc)
            self._head.exception()  # retrieved here: a caller gone by now must not be warned
        self._wake()
        self._conn.close()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -------------------------------------------------------------- the caller's side

    async def head(self) -> None:
        await self._head

    def raise_if_broken(self) -> None:
        """Raise what broke the answer off, if it already did (before any byte is relayed, a
        break is still an error answer)."""
        if self._error is not None:
            raise self._error

    async def read_some(self) -> bytes:
        """The body bytes that arrived since the last call (waiting for some), ``b""`` at its
        end. Raises ``TimeoutError`` or ``ConnectionError`` when the answer broke off."""
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self._chunks = []
                self._buffered = 0
                self._conn.resume_reading()
                return data
            if self._error is not None:
                raise self._error
            if self.done:
                return b""
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; with ``limit``, reading stops once more than ``limit`` bytes came."""
        parts: list[bytes] = []
        size = 0
        while piece := await self.read_some():
            parts.append(piece)
            size += len(piece)
            if limit is not None and size > limit:
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """Give the connection back: to the pool when the answer ended cleanly and the upstream
        keeps it alive, else closed. Once done with the answer; later calls do nothing."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        if self.done and self.keep_alive and not conn.closed:
            conn.reuse()
        else:
            conn.close()


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class Connection(asyncio.Protocol):
    """One keep-alive connection to an origin, at most one answer in flight, and the protocol
    of the connection's one parser (made once: a parser costs more to make than to run).

    The timeouts run on one lazy timer: it is set no later than the current deadline and, when
    it fires early, moved to the deadline as it stands then, so a request on a busy connection
    costs no timer of its own."""

    def __init__(self, pool: UpstreamPool, origin: Origin, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.answer: Answer | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._informational = False
        self._paused = False
        self._sent_at = 0.0  # when the request was written
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._first_byte_s = 0.0
        self._idle_s = 0.0

    # -------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        answer = self.answer
        if answer is None or answer.done:  # nothing asked: an upstream out of turn is dropped
            self.close()
            return
        self._last_read = self.loop.time()
        if not answer.started:
            answer.started = True
            self._watch(self._last_read + self._idle_s)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            answer.fail(BadAnswer("the upstream switched protocols unasked"))
        except httptools.HttpParserError as exc:
            answer.fail(BadAnswer(f"the upstream's answer is not valid HTTP: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport: a half-closed upstream answers nothing more

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        self.pool.forget(self)
        if self.answer is not None:
            self.answer.connection_lost(exc)

    # -------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        answer = self.answer
        if answer is not None and answer.done:  # a second answer to one request
            answer.keep_alive = False
            self.close()

    def on_status(self, status: bytes) -> None:
        if self.answer is not None:
            self.answer.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        answer = self.answer
        if answer is not None and not answer.done:
            answer._raw.append(
                (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            )

    def on_headers_complete(self) -> None:
        answer = self.answer
        if answer is None or answer.done:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (103 Early Hints): the real one follows
            self._informational = True
            answer._raw = []
            answer.reason = ""
            return
        answer.head_arrived(status)

    def on_body(self, body: bytes) -> None:
        answer = self.answer
        if answer is not None and not answer.done:
            answer.body_arrived(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        answer = self.answer
        if answer is not None and not answer.done:
            answer.ended(self._parser.should_keep_alive())

    # -------------------------------------------------------------- one exchange

    def send(
        self, head: bytes, body: bytes, first_byte_s: float, idle_s: float, head_only: bool
    ) -> Answer:
        """Write a request; its answer arrives into the returned :class:`Answer`."""
        transport = self.transport
        assert transport is not None and self.answer is None
        answer = self.answer = Answer(self, head_only)
        self._first_byte_s, self._idle_s = first_byte_s, idle_s
        if len(body) <= 16384:
            transport.write(head + body if body else head)
        else:
            transport.write(head)
            transport.write(body)
        self._sent_at = self.loop.time()
        self._watch(self._sent_at + min(self._first_byte_s, self._idle_s))
        return answer

    def reuse(self) -> None:
        self.answer = None
        self.resume_reading()
        self.pool.put(self)

    def close(self) -> None:
        self._stop_timer()
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    # -------------------------------------------------------------- backpressure and timers

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self._last_read = self.loop.time()  # silence while paused was not the upstream's
            self.transport.resume_reading()

    def _watch(self, deadline: float) -> None:
        """Have the timer fire no later than ``deadline``."""
        if self._timer is None or self._timer_at > deadline:
            self._stop_timer()
            self._timer_at = deadline
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        answer = self.answer
        if answer is None or answer.done:
            return  # nothing awaited
        now = self.loop.time()
        if not answer.started:
            deadline = self._sent_at + self._first_byte_s
            timeout: TimeoutError = FirstByteTimeout("the upstream sent no byte in time")
        elif self._paused:  # the client is slow, not the upstream
            deadline = now + self._idle_s
            timeout = IdleTimeout("")
        else:
            deadline = self._last_read + self._idle_s
            timeout = IdleTimeout("the upstream went silent mid-answer")
        if now >= deadline:
            answer.fail(timeout)
        else:
            self._watch(deadline)


class UpstreamPool:
    """Keep-alive connections per origin, shared by every request of a worker."""

    def __init__(
        self,
        *,
        keepalive_s: float = 30.0,
        max_idle_per_origin: int = MAX_IDLE_PER_ORIGIN,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.keepalive_s = keepalive_s
        self.max_idle_per_origin = max_idle_per_origin
        self._ssl_context = ssl_context
        self._idle: dict[Origin, list[Connection]] = {}
        self._open: set[Connection] = set()
        self._sweep: asyncio.TimerHandle | None = None

    async def request(
        self,
        base_url: str,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        *,
        connect_s: float,
        first_byte_s: float,
        idle_s: float,
    ) -> Answer:
        """Send a request to ``base_url`` + ``target`` (already percent-encoded) and wait for
        its answer's head. The caller reads the body and then calls ``Answer.release``."""
        origin = origin_of(base_url)
        length = len(body) if body or method in _BODY_METHODS else None
        head = request_head(method, origin.base_path + target, origin.host_header, headers, length)
        retry = method in _IDEMPOTENT
        while True:
            conn = self._take(origin)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin, connect_s)
            answer = conn.send(head, body, first_byte_s, idle_s, method == "HEAD")
            try:
                await answer.head()
            except UpstreamClosed:
                conn.close()
                if reused and retry and not answer.started:
                    retry = False
                    continue
                raise
            except BaseException:
                conn.close()  # cancelled, timed out or broken: never pooled
                raise
            return answer

    async def _connect(self, origin: Origin, connect_s: float) -> Connection:
        loop = asyncio.get_running_loop()
        conn = Connection(self, origin, loop)
        secure = origin.scheme == "https"
        context = (self._ssl_context or _default_context()) if secure else None
        try:
            async with asyncio.timeout(connect_s):
                await loop.create_connection(
                    lambda: conn,
                    origin.host,
                    origin.port,
                    ssl=context,
                    server_hostname=origin.host if secure else None,
                )
        except TimeoutError as exc:
            conn.close()
            raise ConnectTimeout(f"no connection to {origin.host_header} in time") from exc
        self._open.add(conn)
        return conn

    def _take(self, origin: Origin) -> Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        oldest = self._loop_time() - self.keepalive_s
        while idle:
            conn = idle.pop()
            transport = conn.transport
            alive = not conn.closed and transport is not None and not transport.is_closing()
            if alive and conn.idle_since > oldest:
                return conn
            self._drop(conn)
        return None

    def put(self, conn: Connection) -> None:
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) >= self.max_idle_per_origin:
            self._drop(conn)
            return
        conn.idle_since = conn.loop.time()
        idle.append(conn)
        if self._sweep is None:
            self._sweep = conn.loop.call_later(self.keepalive_s, self._expire)

    def forget(self, conn: Connection) -> None:
        self._open.discard(conn)

    def _drop(self, conn: Connection) -> None:
        conn.close()
        self._open.discard(conn)

    def _expire(self) -> None:
        """Close connections idle for longer than ``keepalive_s``; run while any are idle."""
        self._sweep = None
        oldest = self._loop_time() - self.keepalive_s
        waiting = False
        for idle in self._idle.values():
            keep = [c for c in idle if not c.closed and c.idle_since > oldest]
            for conn in idle:
                if conn not in keep:
                    self._drop(conn)
            idle[:] = keep
            waiting = waiting or bool(keep)
        if waiting:
            self._sweep = asyncio.get_running_loop().call_later(self.keepalive_s, self._expire)

    @staticmethod
    def _loop_time() -> float:
        return asyncio.get_running_loop().time()

    async def close(self) -> None:
        """Close every connection, idle or in use."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run their close callbacks


@functools.cache
def _default_context() -> ssl.SSLContext:
    return ssl.create_default_context()
