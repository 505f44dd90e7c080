"""The data listener's connections: aiohttp's low-level server with the edges of SPEC §3.5.

- Requests aiohttp's parser refuses (ambiguous framing, bad tokens, a body whose chunked framing
  breaks while the handler reads it) are answered 400 in the OpenAI error shape with an
  ``x-request-id``, never logged as a traceback: the client caused them. A request line without an
  HTTP version (aiohttp reads it as HTTP/0.9), one claiming a version above 1.1, and an HTTP/1.0
  request with ``Transfer-Encoding`` are refused the same way before any handler runs, so none is
  forwarded.
- Slow clients: aiohttp has no header timeout of its own (its keep-alive timeout only closes idle
  connections). A connection's first request head must be complete within
  ``limits.client_header_timeout_s`` of the connection opening, a later one within that time of
  its first byte; a body that stalls (no byte) for ``limits.client_body_timeout_s`` ends the
  request. Either is answered 408 when nothing was answered yet, and the connection is closed.

The hot path pays one comparison per read: a timer is armed only when a read leaves a head
incomplete or a body unfinished, which a request that arrives in one piece never does.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from proxy.dataplane.app import deny_response, new_request_id
from proxy.errors import error_payload

log = logging.getLogger(__name__)

KEEPALIVE_TIMEOUT_S = 75.0  # an idle keep-alive connection is closed (quietly) after this

ClientTimeouts = Callable[[], tuple[float, float]]  # (header_s, body_s) from the live config


def request_line_error(msg: Any) -> str | None:
    """Why a parsed request head must not be forwarded, beyond what aiohttp's parser refuses."""
    version = msg.version
    if version < (1, 0):
        return "The request line has no HTTP version"
    if version > (1, 1):
        return f"HTTP/{version[0]}.{version[1]} is not spoken here"  # HTTP/2 is not HTTP/1 text
    if version == (1, 0) and "transfer-encoding" in msg.headers:
        return "An HTTP/1.0 request must not carry Transfer-Encoding"
    return None


def timeout_answer() -> bytes:
    """A whole 408 response, written straight to the connection (no request object exists)."""
    body = json.dumps(
        error_payload("request_timeout", "The request did not arrive in time.")
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\n"
        "content-type: application/json\r\n"
        f"x-request-id: {new_request_id()}\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class DataRequestHandler(RequestHandler):
    """One client connection of the data listener (see the module docstring)."""

    def __init__(self, manager: Any, *, timeouts: ClientTimeouts, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._client_timeouts = timeouts
        self._header_s = 0.0
        self._body_s = 0.0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None  # the body still arriving, if any
        self._body_seen = 0.0  # when its last byte arrived

    # ------------------------------------------------------------------ reads

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._header_s, self._body_s = self._client_timeouts()
        self._arm_head()

    def data_received(self, data: bytes) -> None:
        body = self._body
        body_pending = body is not None and not body.is_eof()
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._heads_arrived(self._request_count - before)
        elif body_pending:
            self._body_seen = self._loop.time()
        elif self._head_timer is None and not self._force_close:
            self._arm_head()  # the first bytes of a later request's head

    def connection_lost(self, exc: BaseException | None) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None
        self._body = None
        super().connection_lost(exc)

    def _heads_arrived(self, count: int) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        messages = self._messages
        for i in range(len(messages) - count, len(messages)):
            msg, payload = messages[i]
            if isinstance(msg, _ErrInfo):
                body = self._body
                if body is not None and not body.is_eof():
                    # The parser failed inside a body being read (a bad chunk): fail the read,
                    # so the handler answers 400 instead of waiting for bytes that never come.
                    body.set_exception(msg.exc)
                continue
            problem = request_line_error(msg)
            if problem is not None:
                # Answered by handle_error below, which closes the connection: nothing queued
                # after it (a smuggled request) is ever handled.
                refused = _ErrInfo(status=400, exc=BadHttpMessage(problem), message=problem)
                messages[i] = (refused, EMPTY_PAYLOAD)
                self.close()
                return
            if not payload.is_eof():
                self._watch_body(payload)

    # ------------------------------------------------------------------ timers

    def _arm_head(self) -> None:
        self._head_timer = self._loop.call_later(self._header_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._force_close or self.transport is None or self._messages:
            return
        if self._request_in_progress:
            return  # the bytes were a body's last ones after all, or a pipelined head
        self._close_with_408(answer=True)

    def _watch_body(self, payload: StreamReader) -> None:
        self._body = payload
        self._body_seen = self._loop.time()
        if self._body_timer is None:
            self._body_timer = self._loop.call_later(self._body_s, self._body_check)

    def _body_check(self) -> None:
        self._body_timer = None
        payload = self._body
        if payload is None or payload.is_eof() or self.transport is None:
            self._body = None
            return
        due = self._body_seen + self._body_s
        if self._loop.time() < due:
            self._body_timer = self._loop.call_at(due, self._body_check)
            return
        request = self._current_request
        answered = (
            request is None or request.content is not payload or request.writer.output_size > 0
        )
        self._close_with_408(answer=not answered)

    def _close_with_408(self, *, answer: bool) -> None:
        transport = self.transport
        if answer and transport is not None:
            transport.write(timeout_answer())
        log.debug("closed a connection whose request did not arrive in time")
        self._body = None
        self.force_close()  # closes the transport once the 408 is flushed; cancels the handler

    # ------------------------------------------------------------------ errors

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's one place for logging what escaped a request: a client's broken framing or
        a client gone is not a fault of ours, so it gets no traceback; anything else does."""
        exc = kw.get("exc_info")
        if isinstance(exc, HttpProcessingError | ConnectionError):
            log.debug("client error: %s", exc)
            return
        super().log_exception(*args, **kw)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        if isinstance(exc, HttpProcessingError) and status >= 500:
            # The client's framing broke after its head (e.g. a bad chunk while the body is read).
            status, message = 400, exc.message
        elif isinstance(exc, ConnectionError):
            raise exc  # the client went away: aiohttp drops the connection quietly
        if status >= 500:
            self.log_exception("error handling request", exc_info=exc)
            code = "internal_error"
        else:
            log.debug("refused a malformed request: %s", message)
            code = "request_too_large" if status == 413 else "invalid_request"
        detail = None if status >= 500 else f"Malformed HTTP request: {message or status}."
        response = deny_response(code, new_request_id(), detail)
        response.force_close()
        return response


class DataServer(web.Server):
    """The low-level server for the data listener: one :class:`DataRequestHandler` each.

    Request bodies are taken as received (``auto_decompress=False``): a compressed body is
    decoded by ``proxy.surfaces`` to be read, under the body limit, and forwarded as it came.
    """

    def __init__(self, handler: Any, *, timeouts: ClientTimeouts, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", KEEPALIVE_TIMEOUT_S)
        kwargs.setdefault("auto_decompress", False)
        super().__init__(handler, **kwargs)
        self._client_timeouts = timeouts

    def __call__(self) -> RequestHandler:
        return DataRequestHandler(
            self, loop=self._loop, timeouts=self._client_timeouts, **self._kwargs
        )
