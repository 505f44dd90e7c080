"""Sending an allowed request upstream and streaming the answer back (SPEC §3.5).

One shared :class:`aiohttp.ClientSession` serves every upstream. Bytes are relayed as they
arrive, never decoded or buffered: no decompression, no cookie jar, no headers added by the
client library, no redirects followed. The meter reads a bounded, decoded side copy
(``proxy.dataplane.capture``). The one exception to "as sent": a chat stream whose usage the
proxy asked for on the client's behalf, edited back event by event (``usage_stream``).

Timeouts, each independent of the others:

- connect (``connect_s``): name resolution and TCP/TLS connect. Expiry → 504 ``upstream_timeout``;
  a refused or unreachable connect → 502 ``upstream_unavailable``.
- time to first byte (``first_byte_s``): from the request being written until the upstream's
  first byte. It is aiohttp's ``sock_read`` while the response head is awaited. Expiry → 504.
- idle between chunks (``idle_s``): once the response head has arrived, ``sock_read`` on the
  connection is switched to ``idle_s``, so it measures silence from the upstream and nothing else
  (aiohttp stops it while this side is not reading). Expiry after the client response has started
  closes the client connection without the end of the body, so the client sees a truncated
  response rather than a clean end.

Before the client response starts every failure raises :class:`UpstreamError`, and the caller
writes the error body: 504 ``upstream_timeout`` only when one of the timeouts expired; an upstream
that closes, resets or breaks HTTP framing (also mid-way through a small body of declared length)
is 502 ``upstream_unavailable``. After it starts, failures end in a :class:`ForwardResult` with
``completed=False``; the client connection has then been closed, and aiohttp will cancel the
handler task at its next await when it runs with ``handler_cancellation=True``.

A client that goes away cancels the upstream request at once: with ``handler_cancellation=True``
aiohttp cancels the handler (the upstream connection is closed, never pooled, and the
``CancelledError`` propagates); without it, the first failed write to the client does the same
and ``forward`` returns ``completed=False``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import StreamReader, hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import Timeouts, Upstream
from proxy.dataplane.capture import Capture
from proxy.dataplane.codings import DecodeError
from proxy.dataplane.headers import copy_response_headers
from proxy.dataplane.usage_stream import UsageHider

# A non-streamed body up to this size, with a known length, is relayed in one write.
WHOLE_BODY_BYTES = 64 * 1024

# Headers the client library would otherwise invent; the client's own pass through unchanged.
_SKIP_AUTO_HEADERS = (hdrs.USER_AGENT, hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.CONTENT_TYPE)


class UpstreamError(Exception):
    """The upstream could not be reached or did not answer in time, before any response byte."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        answered: bool = False,
        client_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.answered = answered  # the upstream had started answering (tokens may be spent)
        self.client_message = client_message  # None: the error table's message


@contextlib.contextmanager
def upstream_errors() -> Iterator[None]:
    """The one mapping of a failed exchange with the upstream (before its answer) to a code: a
    timeout is 504 ``upstream_timeout``; a refused, reset or broken connection is 502
    ``upstream_unavailable``. Raises ``UpstreamError``."""
    try:
        yield
    except UpstreamError:
        raise
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        phase = "connect" if isinstance(exc, aiohttp.ConnectionTimeoutError) else "first byte"
        raise UpstreamError("upstream_timeout", f"upstream {phase} timed out") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamError("upstream_unavailable", "upstream unreachable") from exc


@dataclass(slots=True)
class ForwardResult:
    response: web.StreamResponse
    status: int
    content_type: str
    is_stream: bool
    captured: bytes  # the meter's decoded side copy (see ``proxy.dataplane.capture``)
    bytes_sent: int
    ttfb_seconds: float
    completed: bool
    capture_whole: bool = True  # False: ``captured`` is the tail of a large body
    capture_problem: str | None = None  # why the copy cannot be read (an unmetered reason)


def make_session(*, limit: int = 0, keepalive_timeout: float = 30.0) -> aiohttp.ClientSession:
    """The one client session for every upstream; ``limit=0`` puts no cap on connections."""
    connector = aiohttp.TCPConnector(
        limit=limit,
        limit_per_host=0,
        keepalive_timeout=keepalive_timeout,
        ttl_dns_cache=10,
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=_SKIP_AUTO_HEADERS,
        timeout=aiohttp.ClientTimeout(total=None),
        trust_env=False,
    )


@functools.lru_cache(maxsize=64)
def client_timeout(timeouts: Timeouts) -> aiohttp.ClientTimeout:
    # sock_read bounds the wait for the response head; the body gets idle_s (see module doc).
    return aiohttp.ClientTimeout(
        total=None,
        connect=timeouts.connect_s,
        sock_connect=timeouts.connect_s,
        sock_read=timeouts.first_byte_s,
    )


def _end_unfinished(content: StreamReader, closed: asyncio.Future[None]) -> None:
    """End a body whose upstream connection closed before it did.

    When the upstream breaks chunked framing mid-body, aiohttp's client closes the connection but
    leaves the body waiting for data forever (no timeout runs on a closed connection); this makes
    the next read fail instead, so the client's connection is cut rather than left hanging.
    """
    if not closed.cancelled():
        closed.exception()  # retrieved: a lost connection is expected here, not an error
    if not content.is_eof() and content.exception() is None:
        content.set_exception(aiohttp.ClientPayloadError("upstream connection closed mid-body"))


def _abort_client(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()


async def forward(
    request: web.BaseRequest,
    *,
    session: aiohttp.ClientSession,
    upstream: Upstream,
    url_path: str,
    body: bytes,
    headers: CIMultiDict[str],
    extra_response_headers: Mapping[str, str] | None,
    strip_response_headers: frozenset[str],
    on_upstream_headers: Callable[[CIMultiDictProxy[str]], None] | None,
    capture_limit: int = 1 << 20,
    hide_usage: bool = False,
) -> ForwardResult:
    """Send the request to ``upstream`` and stream its answer to the client.

    ``url_path`` is the already rewritten, still percent-encoded path with its query string.
    ``hide_usage``: the proxy asked for the usage of this chat stream, so a successful SSE answer
    goes through :class:`UsageHider`. Returns a prepared response the handler must return.
    Raises :class:`UpstreamError` when nothing has been sent to the client yet.
    """
    timeouts = upstream.timeouts
    started = time.monotonic()
    with upstream_errors():
        upstream_resp = await session.request(
            request.method,
            URL(upstream.url + url_path, encoded=True),
            data=body or None,
            headers=headers,
            allow_redirects=False,
            timeout=client_timeout(timeouts),
        )
    ttfb = time.monotonic() - started

    completed = False
    try:
        content = upstream_resp.content
        _watch_idle(upstream_resp, timeouts.idle_s)
        upstream_headers = upstream_resp.headers
        if on_upstream_headers is not None:
            on_upstream_headers(upstream_headers)

        status = upstream_resp.status
        response = web.StreamResponse(status=status, reason=upstream_resp.reason)
        copy_response_headers(upstream_headers, response.headers, strip=strip_response_headers)
        if extra_response_headers:
            response.headers.update(extra_response_headers)

        content_type = upstream_headers.get(hdrs.CONTENT_TYPE, "")
        is_stream = content_type.lower().startswith("text/event-stream")
        capture, hider = _side_copy(
            response,
            is_stream,
            upstream_headers.get(hdrs.CONTENT_ENCODING),
            capture_limit,
            hide_usage and is_stream and status == 200,
        )

        # A small body of known length is usually in hand already: answer it in one write.
        declared = _small_length(upstream_resp)
        if declared is not None and hider is None and not is_stream:
            whole = await _read_whole(content, declared)
            response = web.Response(
                status=status, reason=upstream_resp.reason, body=whole, headers=response.headers
            )
            completed = True
            capture.feed(whole)
            return _result(response, status, content_type, capture, len(whole), ttfb, True)

        try:
            await response.prepare(request)
        except ConnectionError:
            return _result(response, status, content_type, capture, 0, ttfb, False)
        bytes_sent, completed = await _relay(request, content, response, capture, hider)
        return _result(response, status, content_type, capture, bytes_sent, ttfb, completed)
    finally:
        if completed:
            upstream_resp.release()
        else:
            upstream_resp.close()


def _small_length(upstream_resp: aiohttp.ClientResponse) -> int | None:
    """The declared length of a body small enough for one write, else None."""
    declared = upstream_resp.content_length
    return declared if declared is not None and declared <= WHOLE_BODY_BYTES else None


def _watch_idle(upstream_resp: aiohttp.ClientResponse, idle_s: float) -> None:
    """Switch the connection's read timeout to ``idle_s`` for the body (see the module doc)."""
    content = upstream_resp.content
    connection = upstream_resp.connection
    if connection is None or content.is_eof():
        return
    protocol = connection.protocol
    if protocol is not None:
        protocol.read_timeout = idle_s
        protocol.start_timeout()
        closed = protocol.closed
        if closed is not None:
            closed.add_done_callback(functools.partial(_end_unfinished, content))


async def _read_whole(content: aiohttp.StreamReader, declared: int | None) -> bytes:
    try:
        whole = await content.read()
    except TimeoutError as exc:  # idle_s passed with the body unfinished
        raise UpstreamError("upstream_timeout", "upstream stalled mid-body", answered=True) from exc
    except (aiohttp.ClientError, OSError) as exc:  # closed, reset or broken framing
        raise UpstreamError(
            "upstream_unavailable", "upstream broke off mid-body", answered=True
        ) from exc
    if len(whole) != declared:
        raise UpstreamError("upstream_unavailable", "upstream closed mid-body", answered=True)
    return whole


def _side_copy(
    response: web.StreamResponse,
    is_stream: bool,
    encoding: str | None,
    capture_limit: int,
    hide_usage: bool,
) -> tuple[Capture, UsageHider | None]:
    """The meter's copy of the answer, and the :class:`UsageHider` of a stream whose usage the
    proxy asked for (that stream then goes out edited, uncompressed and framed again by this
    server; an unknown coding leaves it as sent, counted unreadable)."""
    capture = Capture(is_stream, encoding, capture_limit)
    if not hide_usage:
        return capture, None
    side = Capture(True, None, capture_limit)
    try:
        hider = UsageHider(encoding, side.feed)
    except DecodeError:
        return capture, None
    response.headers.popall(hdrs.CONTENT_ENCODING, None)
    response.headers.popall(hdrs.CONTENT_LENGTH, None)
    return side, hider


def _result(
    response: web.StreamResponse,
    status: int,
    content_type: str,
    capture: Capture,
    bytes_sent: int,
    ttfb: float,
    completed: bool,
) -> ForwardResult:
    captured = capture.finish(completed)
    return ForwardResult(
        response,
        status,
        content_type,
        capture.is_stream,
        captured,
        bytes_sent,
        ttfb,
        completed,
        capture.whole,
        capture.problem,
    )


async def _relay(
    request: web.BaseRequest,
    content: aiohttp.StreamReader,
    response: web.StreamResponse,
    capture: Capture,
    hider: UsageHider | None,
) -> tuple[int, bool]:
    """Copy the upstream body to the client chunk by chunk: (bytes sent, completed)."""
    bytes_sent = 0
    while True:
        try:
            chunk = await content.readany()
        except (TimeoutError, aiohttp.ClientError, OSError):
            # Upstream went silent past idle_s or broke off mid-body.
            _abort_client(request)
            return bytes_sent, False
        try:
            out = chunk if hider is None else hider.feed(chunk) if chunk else hider.finish()
        except DecodeError:
            _abort_client(request)
            return bytes_sent, False
        try:
            if out:
                await response.write(out)
            if not chunk:
                await response.write_eof()
                return bytes_sent + len(out), True
        except ConnectionError:
            return bytes_sent, False
        bytes_sent += len(out)
        if hider is None:
            capture.feed(chunk)
