"""Sending an allowed request upstream and streaming the answer back (SPEC §3.5).

One :class:`proxy.dataplane.client.UpstreamPool` serves every upstream. Bytes are relayed as they
arrive, never decoded or buffered: no decompression, no cookies, no headers added but ``Host`` and
``Content-Length``, no redirects followed. The meter reads a bounded, decoded side copy
(``proxy.dataplane.capture``). The one exception to "as sent": a chat stream whose usage the
proxy asked for on the client's behalf, edited back event by event (``usage_stream``).

Timeouts, each independent of the others, are run by the pool's connections
(``proxy.dataplane.client``): connect (``connect_s``: expiry → 504 ``upstream_timeout``, a refused
or unreachable connect → 502 ``upstream_unavailable``), time to first byte (``first_byte_s``,
from the request being written: expiry → 504) and idle between chunks (``idle_s``, silence from
the upstream while this side reads). An idle expiry after the client response has started closes
the client connection without the end of the body, so the client sees a truncated response
rather than a clean end.

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

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import Upstream
from proxy.dataplane.capture import Capture
from proxy.dataplane.client import Answer, ConnectTimeout, InvalidHeader, UpstreamPool
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
    except InvalidHeader as exc:
        raise UpstreamError("invalid_request", str(exc), client_message=str(exc)) from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        connect = isinstance(exc, ConnectTimeout | aiohttp.ConnectionTimeoutError)
        phase = "connect" if connect else "first byte"
        raise UpstreamError("upstream_timeout", f"upstream {phase} timed out") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamError("upstream_unavailable", "upstream unreachable") from exc


async def send(
    pool: UpstreamPool,
    upstream: Upstream,
    method: str,
    url_path: str,
    headers: CIMultiDict[str],
    body: bytes,
) -> Answer:
    """Send a request to ``upstream`` under its timeouts and wait for the answer's head; the
    caller reads the body and releases the answer. Raises :class:`UpstreamError`."""
    timeouts = upstream.timeouts
    with upstream_errors():
        return await pool.request(
            upstream.url,
            method,
            url_path,
            headers.items(),
            body,
            connect_s=timeouts.connect_s,
            first_byte_s=timeouts.first_byte_s,
            idle_s=timeouts.idle_s,
        )


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
    """The client session for WebSocket upstreams and the classifier (plain requests go through
    :class:`UpstreamPool`); ``limit=0`` puts no cap on connections."""
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


def _abort_client(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()


async def forward(
    request: web.BaseRequest,
    *,
    pool: UpstreamPool,
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
    started = time.monotonic()
    answer = await send(pool, upstream, request.method, url_path, headers, body)
    ttfb = time.monotonic() - started
    try:
        upstream_headers = answer.headers
        if on_upstream_headers is not None:
            on_upstream_headers(upstream_headers)

        status = answer.status
        out = CIMultiDict[str]()
        copy_response_headers(upstream_headers, out, strip=strip_response_headers)
        if extra_response_headers:
            out.update(extra_response_headers)

        content_type = upstream_headers.get(hdrs.CONTENT_TYPE, "")
        is_stream = content_type.lower().startswith("text/event-stream")
        encoding = upstream_headers.get(hdrs.CONTENT_ENCODING)
        reason = answer.reason or None

        # A small body of known length is usually in hand already: answer it in one write.
        small = answer.content_length is not None and answer.content_length <= WHOLE_BODY_BYTES
        if small and not is_stream:
            whole = await read_answer(answer)
            done = web.Response(status=status, reason=reason, body=whole, headers=out)
            if encoding is None and len(whole) <= capture_limit:  # the copy is the body itself
                return ForwardResult(
                    done, status, content_type, False, whole, len(whole), ttfb, True
                )
            capture = Capture(False, encoding, capture_limit)
            capture.feed(whole)
            return _result(done, status, content_type, capture, len(whole), ttfb, True)

        capture, hider = _side_copy(
            out, is_stream, encoding, capture_limit, hide_usage and is_stream and status == 200
        )
        response = web.StreamResponse(status=status, reason=reason, headers=out)
        with upstream_errors():
            answer.raise_if_broken()  # the whole answer came at once, broken: nothing sent yet
        try:
            await response.prepare(request)
        except ConnectionError:
            return _result(response, status, content_type, capture, 0, ttfb, False)
        bytes_sent, completed = await _relay(request, answer, response, capture, hider)
        return _result(response, status, content_type, capture, bytes_sent, ttfb, completed)
    finally:
        answer.release()  # pooled only when the answer ended cleanly


async def read_answer(answer: Answer, limit: int | None = None) -> bytes:
    """A whole body the client has not seen a byte of yet (a break is still an error answer),
    and the answer released. Raises :class:`UpstreamError`."""
    try:
        return await answer.read(limit)
    except TimeoutError as exc:  # idle_s passed with the body unfinished
        raise UpstreamError("upstream_timeout", "upstream stalled mid-body", answered=True) from exc
    except OSError as exc:  # closed, reset or broken framing
        raise UpstreamError(
            "upstream_unavailable", "upstream broke off mid-body", answered=True
        ) from exc
    finally:
        answer.release()


def _side_copy(
    out: CIMultiDict[str],
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
    out.popall(hdrs.CONTENT_ENCODING, None)
    out.popall(hdrs.CONTENT_LENGTH, None)
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
    answer: Answer,
    response: web.StreamResponse,
    capture: Capture,
    hider: UsageHider | None,
) -> tuple[int, bool]:
    """Copy the upstream body to the client chunk by chunk: (bytes sent, completed)."""
    bytes_sent = 0
    while True:
        try:
            chunk = await answer.read_some()
        except (TimeoutError, OSError):
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
