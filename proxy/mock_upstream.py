"""An OpenAI-compatible fake model server for the demo, the tests and the benchmarks.

It answers ``POST /v1/chat/completions`` and ``POST /v1/responses`` (JSON, or SSE with
``stream: true``), ``POST /v1/embeddings`` and ``GET /v1/models[/{id}]`` in the shapes the
official ``openai`` SDK parses, with deterministic ``usage`` (prompt tokens = whitespace-separated
words of the prompt, cached and cache-write counts included). Like the real API, a chat stream
carries usage only when asked (``stream_options.include_usage``), and then ``"usage": null`` on
every other chunk.

Its behaviour is driven by knobs, set server-wide (constructor arguments, CLI flags) or per request
through ``x-mock-*`` request headers, so a test can steer it through the proxy:

==============================  ===========================================================
``x-mock-chunks``               number of content chunks of a stream
``x-mock-chunk-delay-ms``       pause between two stream events
``x-mock-first-byte-delay-ms``  pause before the status line and headers are sent
``x-mock-status``               answer with this status (>= 400: an OpenAI-shaped error)
``x-mock-prompt-tokens``        override of the prompt token count
``x-mock-cached-tokens``        cached prompt tokens (default 0)
``x-mock-cache-write-tokens``   prompt tokens written to the cache (default 0)
``x-mock-completion-tokens``    override of the completion token count
``x-mock-safety-flag``          value of the safety-flag response header (empty: none)
``x-mock-response-headers``     extra response headers: a JSON object or list of pairs
``x-mock-reply``                the assistant's text
``x-mock-compress``             compress the answer: ``gzip``, ``deflate``, ``br``, ``zstd``
                                or several in the order applied (``gzip, br``); a stream is
                                flushed event by event, so it still streams
==============================  ===========================================================

``GET /v1/realtime?model=...`` is a WebSocket that answers like the Realtime API (see
``proxy.mock_realtime``); its sessions are listed at ``GET /_mock/realtime``.

Every request is recorded (bounded) and readable in-process (``MockUpstream.requests``) or at
``GET /_mock/requests``; a client that goes away while the server waits for its first byte or
streams is noticed (the handler is cancelled, or a write fails) and recorded per ``x-request-id``
at ``GET /_mock/disconnects``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import itertools
import json
import signal
import struct
import sys
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import brotli
import zstandard
from aiohttp import web

from proxy import eventloop
from proxy.mock_realtime import Realtime

DEFAULT_MODELS: Final = (
    "gpt-5.6-sol",
    "gpt-5.6-terra",
    "gpt-5.6-luna",
    "gpt-5.5-alpha",
    "gpt-4o-mini",
)
DEFAULT_REPLY: Final = "This is a mock reply from the upstream model."
DEFAULT_SAFETY_FLAG_HEADER: Final = "x-safety-flag"
DEFAULT_PORT: Final = 8089
MODEL_CREATED: Final = 1_700_000_000

KNOB_PREFIX: Final = "x-mock-"
SSE_DONE: Final = b"data: [DONE]\n\n"
_JSON: Final = "application/json"
_SSE_HEADERS: Final = (("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"))


@dataclass(frozen=True, slots=True)
class Knobs:
    """How one answer behaves; server-wide defaults, overridden per request by headers."""

    chunks: int = 4
    chunk_delay_ms: float = 0.0
    first_byte_delay_ms: float = 0.0
    status: int | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None
    completion_tokens: int | None = None
    safety_flag: str | None = None
    response_headers: tuple[tuple[str, str], ...] = ()
    reply: str = DEFAULT_REPLY
    compress: tuple[str, ...] = ()


class KnobError(ValueError):
    """A request header ``x-mock-*`` that is unknown or has an unusable value."""


# header name -> (Knobs field, smallest allowed value)
_INT_KNOBS: Final[dict[str, tuple[str, int]]] = {
    "x-mock-chunks": ("chunks", 1),
    "x-mock-status": ("status", 200),
    "x-mock-prompt-tokens": ("prompt_tokens", 0),
    "x-mock-cached-tokens": ("cached_tokens", 0),
    "x-mock-cache-write-tokens": ("cache_write_tokens", 0),
    "x-mock-completion-tokens": ("completion_tokens", 0),
}
_MS_KNOBS: Final[dict[str, str]] = {
    "x-mock-chunk-delay-ms": "chunk_delay_ms",
    "x-mock-first-byte-delay-ms": "first_byte_delay_ms",
}


def knobs_from_headers(defaults: Knobs, headers: Iterable[tuple[str, str]]) -> Knobs:
    """The knobs for one request: ``defaults`` with every ``x-mock-*`` header applied."""
    changes: dict[str, Any] = {}
    for raw_name, value in headers:
        name = raw_name.lower()
        if not name.startswith(KNOB_PREFIX):
            continue
        if name in _INT_KNOBS:
            field, smallest = _INT_KNOBS[name]
            try:
                number = int(value)
            except ValueError:
                raise KnobError(f"{name}: not an integer: {value!r}") from None
            if number < smallest or (field == "status" and number > 599):
                raise KnobError(f"{name}: out of range: {number}")
            changes[field] = number
        elif name in _MS_KNOBS:
            try:
                millis = float(value)
            except ValueError:
                raise KnobError(f"{name}: not a number: {value!r}") from None
            if not millis >= 0:
                raise KnobError(f"{name}: must be >= 0: {value!r}")
            changes[_MS_KNOBS[name]] = millis
        elif name == "x-mock-safety-flag":
            changes["safety_flag"] = value or None
        elif name == "x-mock-response-headers":
            changes["response_headers"] = parse_header_pairs(value)
        elif name == "x-mock-reply":
            changes["reply"] = value
        elif name == "x-mock-compress":
            changes["compress"] = parse_codings(value)
        else:
            raise KnobError(f"unknown mock knob: {name}")
    return replace(defaults, **changes) if changes else defaults


def parse_header_pairs(text: str) -> tuple[tuple[str, str], ...]:
    """Headers from JSON: an object ``{"name": "value"}`` or a list of ``[name, value]`` pairs."""
    try:
        decoded = json.loads(text)
    except ValueError:
        raise KnobError("x-mock-response-headers: not JSON") from None
    items: Iterable[Any] = decoded.items() if isinstance(decoded, dict) else decoded
    if not isinstance(items, Iterable) or isinstance(items, str):
        raise KnobError("x-mock-response-headers: want an object or a list of pairs")
    pairs: list[tuple[str, str]] = []
    for item in items:
        if not (isinstance(item, list | tuple) and len(item) == 2):
            raise KnobError("x-mock-response-headers: want [name, value] pairs")
        name, value = item
        if not (isinstance(name, str) and isinstance(value, str)) or any(
            c in name + value for c in "\r\n"
        ):
            raise KnobError("x-mock-response-headers: names and values are one-line strings")
        pairs.append((name, value))
    return tuple(pairs)


CODINGS: Final = ("gzip", "deflate", "br", "zstd")


def parse_codings(text: str) -> tuple[str, ...]:
    """``gzip, br`` -> ("gzip", "br"); every name must be one of :data:`CODINGS`."""
    names = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    for name in names:
        if name not in CODINGS:
            raise KnobError(f"x-mock-compress: unknown coding {name!r} (known: {CODINGS})")
    return names


class _Compressor:
    """One coding applied to a body piece by piece; every piece is flushed so it can be decoded
    on arrival (a compressed stream still streams)."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        if coding in ("gzip", "deflate"):
            self._z = zlib.compressobj(wbits=31 if coding == "gzip" else zlib.MAX_WBITS)
        elif coding == "br":
            self._br = brotli.Compressor()
        else:
            self._zs = zstandard.ZstdCompressor().compressobj()

    def piece(self, data: bytes) -> bytes:
        if self.coding in ("gzip", "deflate"):
            return self._z.compress(data) + self._z.flush(zlib.Z_SYNC_FLUSH)
        if self.coding == "br":
            return bytes(self._br.process(data)) + bytes(self._br.flush())
        return self._zs.compress(data) + self._zs.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def end(self) -> bytes:
        if self.coding in ("gzip", "deflate"):
            return self._z.flush()
        if self.coding == "br":
            return bytes(self._br.finish())
        return self._zs.flush()


class Compression:
    """Several codings in the order applied (the first one is applied first)."""

    def __init__(self, codings: Sequence[str]) -> None:
        self.codings = tuple(codings)
        self._stages = [_Compressor(coding) for coding in codings]

    @property
    def header(self) -> str:
        return ", ".join(self.codings)

    def piece(self, data: bytes) -> bytes:
        for stage in self._stages:
            data = stage.piece(data)
        return data

    def end(self) -> bytes:
        data = b""
        for stage in self._stages:
            data = stage.piece(data) + stage.end() if data else stage.end()
        return data

    def whole(self, data: bytes) -> bytes:
        return self.piece(data) + self.end()


@dataclass(frozen=True, slots=True)
class ReportedUsage:
    """The token counts the mock reports for one answer, in the upstream's own names."""

    prompt_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def chat(self) -> dict[str, Any]:
        """The ``usage`` object of the chat completions API."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {
                "cached_tokens": self.cached_tokens,
                "cache_write_tokens": self.cache_write_tokens,
                "audio_tokens": 0,
            },
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def responses(self) -> dict[str, Any]:
        """The ``usage`` object of the responses API."""
        return {
            "input_tokens": self.prompt_tokens,
            "input_tokens_details": {
                "cached_tokens": self.cached_tokens,
                "cache_write_tokens": self.cache_write_tokens,
            },
            "output_tokens": self.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.total_tokens,
        }


def usage_for(knobs: Knobs, prompt_words: int) -> ReportedUsage:
    """Deterministic usage: counted words unless a knob overrides a number."""
    return ReportedUsage(
        prompt_tokens=prompt_words if knobs.prompt_tokens is None else knobs.prompt_tokens,
        cached_tokens=knobs.cached_tokens or 0,
        cache_write_tokens=knobs.cache_write_tokens or 0,
        completion_tokens=(
            len(knobs.reply.split()) if knobs.completion_tokens is None else knobs.completion_tokens
        ),
    )


def _words(content: Any) -> int:
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(_words(part) for part in content)
    if isinstance(content, dict):
        if "content" in content:
            return _words(content["content"])
        text = content.get("text")
        return len(text.split()) if isinstance(text, str) else 0
    return 0


def prompt_words(payload: dict[str, Any]) -> int:
    """Whitespace-separated words of chat ``messages`` or responses ``input``/``instructions``."""
    return (
        _words(payload.get("messages"))
        + _words(payload.get("input"))
        + _words(payload.get("instructions"))
    )


@functools.lru_cache(maxsize=256)
def split_reply(text: str, chunks: int) -> tuple[str, ...]:
    """``text`` cut into ``chunks`` consecutive pieces of near-equal length (some may be empty)."""
    size, extra = divmod(len(text), chunks)
    pieces: list[str] = []
    start = 0
    for index in range(chunks):
        end = start + size + (1 if index < extra else 0)
        pieces.append(text[start:end])
        start = end
    return tuple(pieces)


@functools.lru_cache(maxsize=1024)
def _json_bytes(value: str) -> bytes:
    return json.dumps(value).encode()


@functools.lru_cache(maxsize=1024)
def _chat_usage_bytes(usage: ReportedUsage) -> bytes:
    return json.dumps(usage.chat(), separators=(",", ":")).encode()


@functools.lru_cache(maxsize=64)
def _chat_body_parts(reply: str) -> tuple[bytes, bytes, bytes, bytes]:
    # The non-streaming chat answer is the benchmarks' hot path: everything but the id, the
    # clock, the model and the usage is encoded once per reply text.
    message = json.dumps(
        {"role": "assistant", "content": reply, "refusal": None, "annotations": []},
        separators=(",", ":"),
    )
    return (
        b'{"id":"',
        b'","object":"chat.completion","created":',
        b',"model":',
        b',"choices":[{"index":0,"message":'
        + message.encode()
        + b',"logprobs":null,"finish_reason":"stop"}],"usage":',
    )


def _response_fields(
    response_id: str, created: int, model: str, instructions: Any
) -> dict[str, Any]:
    """The fields of a Responses API ``response`` object that do not change while it streams."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": None,
        "error": None,
        "incomplete_details": None,
        "instructions": instructions if isinstance(instructions, str) else None,
        "max_output_tokens": None,
        "model": model,
        "output": [],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": None,
        "user": None,
        "metadata": {},
    }


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    """An OpenAI-shaped error body."""
    if status == 401:
        kind = "authentication_error"
    elif status == 403:
        kind = "permission_error"
    elif status == 429:
        kind = "rate_limit_error"
    elif status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    return _dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


def _decoded_headers(request: web.BaseRequest) -> tuple[tuple[str, str], ...]:
    return tuple(
        (name.decode("latin-1"), value.decode("latin-1")) for name, value in request.raw_headers
    )


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the mock received it."""

    request_id: str
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    peer: str | None
    peer_port: int | None
    received_at: float

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in arrival order."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "headers": [list(pair) for pair in self.headers],
            "body": self.body.decode("utf-8", "replace"),
            "body_base64": base64.b64encode(self.body).decode("ascii"),
            "peer": self.peer,
            "peer_port": self.peer_port,
            "received_at": self.received_at,
        }


@dataclass(frozen=True, slots=True)
class Disconnect:
    """A client that went away before its answer was complete.

    ``phase`` is ``first_byte`` (before the status line was sent) or ``stream`` (after);
    ``at`` is wall-clock time and ``monotonic`` the system-wide monotonic clock, both comparable
    with readings taken in another process on the same machine.
    """

    request_id: str
    path: str
    phase: str
    events_sent: int
    at: float
    monotonic: float

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "path": self.path,
            "phase": self.phase,
            "events_sent": self.events_sent,
            "at": self.at,
            "monotonic": self.monotonic,
        }


@dataclass(slots=True)
class _Exchange:
    request_id: str
    path: str
    phase: str = "first_byte"
    events_sent: int = 0
    disconnected: bool = False


_Answer = Callable[[web.Request, bytes, Knobs, _Exchange], Awaitable[web.StreamResponse]]


class MockUpstream:
    """The fake model server: construct, ``await start()``, use ``url``, ``await stop()``."""

    def __init__(
        self,
        *,
        models: Sequence[str] = DEFAULT_MODELS,
        chunks: int = 4,
        chunk_delay_ms: float = 0.0,
        first_byte_delay_ms: float = 0.0,
        status: int | None = None,
        prompt_tokens: int | None = None,
        cached_tokens: int | None = None,
        cache_write_tokens: int | None = None,
        completion_tokens: int | None = None,
        safety_flag: str | None = None,
        response_headers: Iterable[tuple[str, str]] = (),
        reply: str = DEFAULT_REPLY,
        compress: Sequence[str] = (),
        safety_flag_header: str = DEFAULT_SAFETY_FLAG_HEADER,
        max_recorded: int = 1000,
    ) -> None:
        if chunks < 1:
            raise ValueError("chunks must be >= 1")
        self.models: tuple[str, ...] = tuple(models)
        self.defaults = Knobs(
            chunks=chunks,
            chunk_delay_ms=chunk_delay_ms,
            first_byte_delay_ms=first_byte_delay_ms,
            status=status,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            cache_write_tokens=cache_write_tokens,
            completion_tokens=completion_tokens,
            safety_flag=safety_flag,
            response_headers=tuple(response_headers),
            reply=reply,
            compress=parse_codings(",".join(compress)),
        )
        self.safety_flag_header = safety_flag_header
        self.max_recorded = max_recorded
        self._requests: deque[RecordedRequest] = deque(maxlen=max(max_recorded, 1))
        self._disconnects: OrderedDict[str, Disconnect] = OrderedDict()
        self._disconnect_event = asyncio.Event()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._host = "127.0.0.1"
        self._port = 0
        self.realtime = Realtime(max_recorded)
        self.app = self._make_app()

    # lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0: a free port) and return the bound port."""
        if self._runner is not None:
            raise RuntimeError("mock upstream already started")
        runner = web.AppRunner(
            self.app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, backlog=1024).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._host = host
        self._port = int(runner.addresses[0][1])
        return self._port

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The server's root, e.g. ``http://127.0.0.1:8089``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    @property
    def base_url(self) -> str:
        """The OpenAI API root (``url`` + ``/v1``), as SDK clients want it."""
        return self.url + "/v1"

    # recording

    @property
    def requests(self) -> list[RecordedRequest]:
        """Recorded requests, oldest first."""
        return list(self._requests)

    @property
    def disconnects(self) -> dict[str, Disconnect]:
        """Recorded disconnects by request id."""
        return dict(self._disconnects)

    def clear(self) -> None:
        """Forget every recorded request and disconnect."""
        self._requests.clear()
        self._disconnects.clear()

    async def wait_for_disconnect(self, request_id: str, timeout: float) -> Disconnect:
        """The disconnect of ``request_id``, waiting up to ``timeout`` seconds for it."""
        async with asyncio.timeout(timeout):
            while request_id not in self._disconnects:
                await self._disconnect_event.wait()
        return self._disconnects[request_id]

    def _record(self, request: web.Request, body: bytes) -> _Exchange:
        request_id = request.headers.get("x-request-id") or f"mock-{next(self._ids)}"
        exchange = _Exchange(request_id=request_id, path=request.path)
        if self.max_recorded <= 0:
            return exchange
        peer: str | None = None
        peer_port: int | None = None
        transport = request.transport
        peername = transport.get_extra_info("peername") if transport is not None else None
        if isinstance(peername, tuple) and len(peername) >= 2:
            peer, peer_port = str(peername[0]), int(peername[1])
        self._requests.append(
            RecordedRequest(
                request_id=request_id,
                method=request.method,
                path=request.path_qs,
                headers=_decoded_headers(request),
                body=body,
                peer=peer,
                peer_port=peer_port,
                received_at=time.time(),
            )
        )
        return exchange

    def _note_disconnect(self, exchange: _Exchange) -> None:
        if exchange.disconnected:
            return
        exchange.disconnected = True
        self._disconnects[exchange.request_id] = Disconnect(
            request_id=exchange.request_id,
            path=exchange.path,
            phase=exchange.phase,
            events_sent=exchange.events_sent,
            at=time.time(),
            monotonic=time.monotonic(),
        )
        while len(self._disconnects) > max(self.max_recorded, 1):
            self._disconnects.popitem(last=False)
        self._disconnect_event.set()
        self._disconnect_event = asyncio.Event()

    # routing

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._guarded(self._chat_completions))
        app.router.add_post("/v1/responses", self._guarded(self._responses))
        app.router.add_post("/v1/embeddings", self._guarded(self._embeddings))
        app.router.add_get("/v1/models", self._guarded(self._list_models))
        app.router.add_get("/v1/models/{model_id}", self._guarded(self._get_model))
        app.router.add_get("/_mock/requests", self._get_requests)
        app.router.add_delete("/_mock/requests", self._delete_requests)
        app.router.add_get("/_mock/disconnects", self._get_disconnects)
        app.router.add_delete("/_mock/disconnects", self._delete_disconnects)
        self.realtime.install(app)  # GET /v1/realtime (WebSocket), /_mock/realtime
        app.router.add_route("*", "/{tail:.*}", self._guarded(self._unknown_route))
        return app

    def _guarded(
        self,
        answer: _Answer,
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Record the request, apply the common knobs, and notice a client that goes away."""

        async def handler(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            exchange = self._record(request, body)
            try:
                knobs = knobs_from_headers(self.defaults, request.headers.items())
            except KnobError as exc:
                return self._json(400, error_body(400, str(exc), "invalid_mock_knob"), ())
            try:
                if knobs.first_byte_delay_ms > 0:
                    await asyncio.sleep(knobs.first_byte_delay_ms / 1000)
                if knobs.status is not None and knobs.status >= 400:
                    message = f"mock upstream answered {knobs.status} as asked"
                    return self._json(
                        knobs.status,
                        error_body(knobs.status, message, "mock_error"),
                        self._extra_headers(knobs),
                    )
                response = await answer(request, body, knobs, exchange)
                if knobs.compress and isinstance(response, web.Response) and response.body:
                    raw = response.body
                    assert isinstance(raw, bytes)
                    compression = Compression(knobs.compress)
                    response.body = compression.whole(raw)
                    response.headers["Content-Encoding"] = compression.header
                return response
            except asyncio.CancelledError:
                transport = request.transport
                if transport is None or transport.is_closing():
                    self._note_disconnect(exchange)
                raise

        return handler

    def _extra_headers(self, knobs: Knobs) -> list[tuple[str, str]]:
        headers = list(knobs.response_headers)
        if knobs.safety_flag:
            headers.append((self.safety_flag_header, knobs.safety_flag))
        return headers

    @staticmethod
    def _json(status: int, body: bytes, headers: Iterable[tuple[str, str]]) -> web.Response:
        return web.Response(status=status, body=body, headers=[("Content-Type", _JSON), *headers])

    @staticmethod
    def _payload(body: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(body)
        except ValueError:
            raise KnobError("the body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise KnobError("the body must be a JSON object")
        if not isinstance(payload.get("model"), str):
            raise KnobError("you must provide a model parameter")
        return payload

    # answers

    async def _chat_completions(
        self, request: web.Request, body: bytes, knobs: Knobs, exchange: _Exchange
    ) -> web.StreamResponse:
        try:
            payload = self._payload(body)
        except KnobError as exc:
            return self._json(400, error_body(400, str(exc)), ())
        model: str = payload["model"]
        usage = usage_for(knobs, prompt_words(payload))
        completion_id = f"chatcmpl-mock{next(self._ids):08x}"
        created = int(time.time())
        status = knobs.status or 200
        if payload.get("stream") is not True:
            parts = _chat_body_parts(knobs.reply)
            answer = b"".join(
                (
                    parts[0],
                    completion_id.encode(),
                    parts[1],
                    str(created).encode(),
                    parts[2],
                    _json_bytes(model),
                    parts[3],
                    _chat_usage_bytes(usage),
                    b"}",
                )
            )
            return self._json(status, answer, self._extra_headers(knobs))

        options = payload.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        head: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
        }

        def chunk(choices: list[dict[str, Any]], chunk_usage: Any = None) -> bytes:
            event = {**head, "choices": choices}
            if include_usage:
                event["usage"] = chunk_usage
            return b"data: " + _dumps(event) + b"\n\n"

        def events() -> Iterator[bytes]:
            for index, piece in enumerate(split_reply(knobs.reply, knobs.chunks)):
                delta = (
                    {"role": "assistant", "content": piece} if index == 0 else {"content": piece}
                )
                yield chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])
            yield chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}])
            if include_usage:
                yield chunk([], usage.chat())
            yield SSE_DONE

        return await self._stream(request, status, knobs, exchange, events())

    async def _responses(
        self, request: web.Request, body: bytes, knobs: Knobs, exchange: _Exchange
    ) -> web.StreamResponse:
        try:
            payload = self._payload(body)
        except KnobError as exc:
            return self._json(400, error_body(400, str(exc)), ())
        model: str = payload["model"]
        usage = usage_for(knobs, prompt_words(payload))
        serial = next(self._ids)
        response_id = f"resp_mock{serial:08x}"
        message_id = f"msg_mock{serial:08x}"
        created = int(time.time())
        status = knobs.status or 200
        instructions = payload.get("instructions")

        def response_object(state: str, output: list[Any], with_usage: bool) -> dict[str, Any]:
            return {
                **_response_fields(response_id, created, model, instructions),
                "status": state,
                "output": output,
                "usage": usage.responses() if with_usage else None,
            }

        def text_part(text: str) -> dict[str, Any]:
            return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

        def message(state: str, content: list[Any]) -> dict[str, Any]:
            return {
                "id": message_id,
                "type": "message",
                "status": state,
                "role": "assistant",
                "content": content,
            }

        done_message = message("completed", [text_part(knobs.reply)])
        if payload.get("stream") is not True:
            answer = _dumps(response_object("completed", [done_message], True))
            return self._json(status, answer, self._extra_headers(knobs))

        def events() -> Iterator[bytes]:
            sequence = itertools.count()

            def event(kind: str, **fields: Any) -> bytes:
                data = {"type": kind, "sequence_number": next(sequence), **fields}
                return b"event: " + kind.encode() + b"\ndata: " + _dumps(data) + b"\n\n"

            where = {"item_id": message_id, "output_index": 0, "content_index": 0}
            yield event("response.created", response=response_object("in_progress", [], False))
            yield event("response.in_progress", response=response_object("in_progress", [], False))
            yield event(
                "response.output_item.added", output_index=0, item=message("in_progress", [])
            )
            yield event("response.content_part.added", **where, part=text_part(""))
            for piece in split_reply(knobs.reply, knobs.chunks):
                yield event("response.output_text.delta", **where, delta=piece, logprobs=[])
            yield event("response.output_text.done", **where, text=knobs.reply, logprobs=[])
            yield event("response.content_part.done", **where, part=text_part(knobs.reply))
            yield event("response.output_item.done", output_index=0, item=done_message)
            yield event(
                "response.completed", response=response_object("completed", [done_message], True)
            )

        return await self._stream(request, status, knobs, exchange, events())

    async def _stream(
        self,
        request: web.Request,
        status: int,
        knobs: Knobs,
        exchange: _Exchange,
        events: Iterator[bytes],
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=status, headers=[*_SSE_HEADERS, *self._extra_headers(knobs)]
        )
        compression = Compression(knobs.compress) if knobs.compress else None
        if compression is not None:
            response.headers["Content-Encoding"] = compression.header
        await response.prepare(request)
        exchange.phase = "stream"
        delay = knobs.chunk_delay_ms / 1000
        try:
            for data in events:
                if delay > 0 and exchange.events_sent:
                    await asyncio.sleep(delay)
                await response.write(data if compression is None else compression.piece(data))
                exchange.events_sent += 1
            if compression is not None:
                await response.write(compression.end())
        except ConnectionError:
            self._note_disconnect(exchange)
        return response

    async def _embeddings(
        self, request: web.Request, body: bytes, knobs: Knobs, exchange: _Exchange
    ) -> web.StreamResponse:
        try:
            payload = self._payload(body)
        except KnobError as exc:
            return self._json(400, error_body(400, str(exc)), ())
        inputs = payload.get("input")
        texts: list[Any] = inputs if isinstance(inputs, list) else [inputs]
        words = 0
        for text in texts:  # a string, or a list of token ids
            words += len(text) if isinstance(text, list) else _words(text)
        as_base64 = payload.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            seed = zlib.crc32(str(text).encode())
            vector = [((seed >> shift) % 1000) / 1000.0 for shift in range(0, 32, 4)]
            value: Any = vector
            if as_base64:
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": value})
        prompt = words if knobs.prompt_tokens is None else knobs.prompt_tokens
        answer = {
            "object": "list",
            "data": data,
            "model": payload["model"],
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }
        return self._json(knobs.status or 200, _dumps(answer), self._extra_headers(knobs))

    async def _list_models(
        self, request: web.Request, body: bytes, knobs: Knobs, exchange: _Exchange
    ) -> web.StreamResponse:
        listing = {"object": "list", "data": [self._model(model) for model in self.models]}
        return self._json(knobs.status or 200, _dumps(listing), self._extra_headers(knobs))

    async def _get_model(
        self, request: web.Request, body: bytes, knobs: Knobs, exchange: _Exchange
    ) -> web.StreamResponse:
        model_id = request.match_info["model_id"]
        if model_id not in self.models:
            message = f"The model '{model_id}' does not exist"
            return self._json(404, error_body(404, message, "model_not_found"), ())
        answer = _dumps(self._model(model_id))
        return self._json(knobs.status or 200, answer, self._extra_headers(knobs))

    @staticmethod
    def _model(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": MODEL_CREATED, "owned_by": "mock"}

    async def _unknown_route(
        self, request: web.Request, body: bytes, knobs: Knobs, exchange: _Exchange
    ) -> web.StreamResponse:
        message = f"Unknown request URL: {request.method} {request.path}"
        return self._json(404, error_body(404, message, "unknown_url"), ())

    # control endpoints, not recorded

    async def _get_requests(self, request: web.Request) -> web.Response:
        wanted = request.query.get("request_id")
        recorded = [
            item.to_json() for item in self._requests if wanted is None or item.request_id == wanted
        ]
        return web.json_response({"requests": recorded})

    async def _delete_requests(self, request: web.Request) -> web.Response:
        self._requests.clear()
        return web.json_response({"cleared": True})

    async def _get_disconnects(self, request: web.Request) -> web.Response:
        listing = {rid: item.to_json() for rid, item in self._disconnects.items()}
        return web.json_response({"disconnects": listing})

    async def _delete_disconnects(self, request: web.Request) -> web.Response:
        self._disconnects.clear()
        return web.json_response({"cleared": True})


async def run_forever(
    upstream: MockUpstream | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    until: asyncio.Event | None = None,
    on_ready: Callable[[MockUpstream], None] | None = None,
) -> None:
    """Serve ``upstream`` (default: a new one) until ``until`` is set or the task is cancelled."""
    server = upstream if upstream is not None else MockUpstream()
    await server.start(host, port)
    try:
        if on_ready is not None:
            on_ready(server)
        await (until or asyncio.Event()).wait()
    finally:
        await server.stop()


def _header_arg(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"want NAME:VALUE, got {text!r}")
    return name.strip(), value.strip()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.mock_upstream",
        description="OpenAI-compatible fake model server (knobs: see the module docstring).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument(
        "--models", default=",".join(DEFAULT_MODELS), help="comma-separated model ids"
    )
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    parser.add_argument("--first-byte-delay-ms", type=float, default=0.0)
    parser.add_argument("--status", type=int, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--cached-tokens", type=int, default=None)
    parser.add_argument("--cache-write-tokens", type=int, default=None)
    parser.add_argument("--completion-tokens", type=int, default=None)
    parser.add_argument("--safety-flag", default=None, help="e.g. 'cyber;severity=2'")
    parser.add_argument("--safety-flag-header", default=DEFAULT_SAFETY_FLAG_HEADER)
    parser.add_argument(
        "--response-header",
        action="append",
        type=_header_arg,
        default=[],
        metavar="NAME:VALUE",
        help="extra response header (repeatable)",
    )
    parser.add_argument("--reply", default=DEFAULT_REPLY)
    parser.add_argument("--compress", default="", help="e.g. 'gzip' or 'zstd' (see knobs)")
    parser.add_argument("--max-recorded", type=int, default=1000)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the mock upstream in the foreground until SIGINT or SIGTERM."""
    args = _parser().parse_args(argv)
    if args.chunks < 1:
        print("--chunks must be >= 1", file=sys.stderr)
        return 2
    upstream = MockUpstream(
        models=[model.strip() for model in args.models.split(",") if model.strip()],
        chunks=args.chunks,
        chunk_delay_ms=args.chunk_delay_ms,
        first_byte_delay_ms=args.first_byte_delay_ms,
        status=args.status,
        prompt_tokens=args.prompt_tokens,
        cached_tokens=args.cached_tokens,
        cache_write_tokens=args.cache_write_tokens,
        completion_tokens=args.completion_tokens,
        safety_flag=args.safety_flag,
        response_headers=args.response_header,
        reply=args.reply,
        compress=[args.compress] if args.compress else [],
        safety_flag_header=args.safety_flag_header,
        max_recorded=args.max_recorded,
    )

    def ready(server: MockUpstream) -> None:
        print(f"mock upstream listening on {server.url}", flush=True)

    async def serve() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        await run_forever(upstream, host=args.host, port=args.port, until=stopping, on_ready=ready)

    with contextlib.suppress(KeyboardInterrupt):
        eventloop.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
