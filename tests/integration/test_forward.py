"""Forwarding mechanics (SPEC §3.5) over real loopback servers.

A small stand-in proxy app calls the header functions and ``forward`` the way the data-plane
handler does; small upstream apps defined here play the model service.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import Timeouts, Upstream
from proxy.dataplane.capture import SSE_CAPTURE_BYTES, TAIL_BYTES
from proxy.dataplane.client import UpstreamPool
from proxy.dataplane.forward import ForwardResult, UpstreamError, forward
from proxy.dataplane.headers import (
    downstream_response_headers,
    smuggling_error,
    upstream_request_headers,
)
from proxy.errors import DEFAULT_BODIES

UPSTREAM_KEY = "sk-upstream-secret"
CLIENT_KEY = "sk-client-secret"
FLAG_HEADER = "x-safety-flag"
SLOW = Timeouts(connect_s=5.0, first_byte_s=5.0, idle_s=5.0)
DEADLINE = 5.0
GZIP_BODY = gzip.compress(b'{"hello": "world"}' * 50, mtime=0)


async def poll(check: Callable[[], bool], deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not check():
        assert time.monotonic() < end, "condition not reached before the deadline"
        await asyncio.sleep(0.002)


@dataclass
class Sightings:
    """What the test upstream saw."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    started: list[float] = field(default_factory=list)
    closed: list[float] = field(default_factory=list)
    release_second: asyncio.Event = field(default_factory=asyncio.Event)


Serve = Callable[..., Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def go(app: web.Application, *, handler_cancellation: bool = True) -> str:
        runner = web.AppRunner(app, handler_cancellation=handler_cancellation, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield go
    for runner in reversed(runners):
        await runner.cleanup()


def upstream_app(seen: Sightings) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        seen.requests.append(
            {
                "headers": list(request.headers.items()),
                "path_qs": request.raw_path,
                "method": request.method,
                "body": (await request.read()).decode(),
            }
        )
        return web.json_response({"ok": True})

    async def chat(request: web.Request) -> web.Response:
        body = json.dumps({"id": "c1", "usage": {"prompt_tokens": 3, "completion_tokens": 5}})
        return web.Response(
            status=201,
            body=body.encode(),
            content_type="application/json",
            headers={
                "x-upstream-note": "kept",
                "x-request-id": "upstream-rid",
                FLAG_HEADER: "cyber;severity=2",
                "Connection": "x-upstream-hop",
                "x-upstream-hop": "secret",
                "Keep-Alive": "timeout=5",
                "Proxy-Authenticate": "Basic",
            },
        )

    async def big(request: web.Request) -> web.Response:
        return web.Response(
            body=b'{"pad": "' + b"x" * 5000 + b'"}', content_type="application/json"
        )

    async def gzipped(request: web.Request) -> web.Response:
        return web.Response(
            body=GZIP_BODY,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"n": 1}\n\n')
        await seen.release_second.wait()
        await resp.write(b'data: {"n": 2, "usage": {"completion_tokens": 7}}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def sse_long(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        filler = b'data: {"delta": "' + b"y" * 1000 + b'"}\n\n'
        for _ in range(200):
            await resp.write(filler)
        await resp.write(b'data: {"usage": {"completion_tokens": 9}}\n\ndata: [DONE]\n\n')
        await resp.write_eof()
        return resp

    async def never_answers(request: web.Request) -> web.StreamResponse:
        seen.started.append(time.monotonic())
        try:
            await asyncio.Event().wait()
        finally:
            seen.closed.append(time.monotonic())
        raise AssertionError("unreachable")

    async def stalls_mid_stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"n": 1}\n\n')
        seen.started.append(time.monotonic())
        try:
            await asyncio.Event().wait()
        finally:
            seen.closed.append(time.monotonic())
        return resp

    async def ticks_forever(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        seen.started.append(time.monotonic())
        try:
            while True:
                await resp.write(b'data: {"tick": 1}\n\n')
                await asyncio.sleep(0.01)
        finally:
            seen.closed.append(time.monotonic())

    async def late_head(request: web.Request) -> web.Response:
        # Head after 0.3 s: longer than idle_s, shorter than first_byte_s.
        await asyncio.sleep(0.3)
        return web.json_response({"late": True})

    async def slow_chunks(request: web.Request) -> web.StreamResponse:
        # Chunks 0.15 s apart, 0.6 s in all: longer than first_byte_s, each gap under idle_s.
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for n in range(4):
            await asyncio.sleep(0.15)
            await resp.write(f"data: {n}\n\n".encode())
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_post("/v1/chat", chat)
    app.router.add_get("/big", big)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/sse", sse)
    app.router.add_get("/sse-long", sse_long)
    app.router.add_route("*", "/never", never_answers)
    app.router.add_get("/stall", stalls_mid_stream)
    app.router.add_get("/ticks", ticks_forever)
    app.router.add_get("/late-head", late_head)
    app.router.add_get("/slow-chunks", slow_chunks)
    return app


@dataclass
class Proxy:
    url: str
    results: list[ForwardResult]
    flags: list[str | None]
    handled: list[str]


MakeProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def make_proxy(serve: Serve) -> AsyncIterator[MakeProxy]:
    pools: list[UpstreamPool] = []

    async def go(
        upstream_url: str,
        *,
        timeouts: Timeouts = SLOW,
        trusted: tuple[IPv4Network | IPv6Network, ...] = (),
        handler_cancellation: bool = True,
        capture_limit: int = 1 << 20,
    ) -> Proxy:
        pool = UpstreamPool()
        pools.append(pool)
        upstream = Upstream(name="t", url=upstream_url, api_key_env=None, timeouts=timeouts)
        proxy = Proxy(url="", results=[], flags=[], handled=[])

        async def handle(request: web.Request) -> web.StreamResponse:
            proxy.handled.append(request.path)
            error = smuggling_error(request)
            if error is not None:
                return web.Response(status=400, text=error)
            body = await request.read()
            headers = upstream_request_headers(
                request.headers,
                peer=request.remote,
                trusted_proxies=trusted,
                upstream_api_key=UPSTREAM_KEY,
                request_id="rid-1",
                host=request.host,
            )
            try:
                result = await forward(
                    request,
                    pool=pool,
                    upstream=upstream,
                    url_path=request.raw_path,
                    body=body,
                    headers=headers,
                    extra_response_headers={"x-request-id": "rid-1"},
                    strip_response_headers=frozenset({FLAG_HEADER}),
                    on_upstream_headers=lambda h: proxy.flags.append(h.get(FLAG_HEADER)),
                    capture_limit=capture_limit,
                )
            except UpstreamError as exc:
                status = 504 if exc.code == "upstream_timeout" else 502
                return web.Response(
                    status=status, body=DEFAULT_BODIES[exc.code], content_type="application/json"
                )
            proxy.results.append(result)
            return result.response

        async def clone_check(request: web.Request) -> web.Response:
            # aiohttp's parser never lets such framing through, so the check is exercised on a
            # real request with its headers replaced.
            verdicts = {}
            for name, pairs in {
                "cl+te": [("Content-Length", "4"), ("Transfer-Encoding", "chunked")],
                "cl-cl": [("Content-Length", "4"), ("Content-Length", "5")],
                "cl-cl-same": [("Content-Length", "4"), ("Content-Length", "4")],
                "cl": [("Content-Length", "4")],
                "te": [("Transfer-Encoding", "chunked")],
            }.items():
                clone = request.clone(headers=CIMultiDictProxy(CIMultiDict(pairs)))
                verdicts[name] = smuggling_error(clone)
            return web.json_response(verdicts)

        app = web.Application()
        app.router.add_get("/__smuggling_check", clone_check)
        app.router.add_route("*", "/{tail:.*}", handle)
        proxy.url = await serve(app, handler_cancellation=handler_cancellation)
        return proxy

    yield go
    for pool in pools:
        await pool.close()


@pytest.fixture
async def seen() -> Sightings:
    return Sightings()


@pytest.fixture
async def upstream_url(serve: Serve, seen: Sightings) -> str:
    return await serve(upstream_app(seen))


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def seen_headers(seen: Sightings) -> CIMultiDict[str]:
    return CIMultiDict(seen.requests[-1]["headers"])


async def test_credentials_replaced_and_identity_headers_removed(
    make_proxy: MakeProxy, upstream_url: str, seen: Sightings, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(upstream_url)
    sent = {
        "Authorization": f"Bearer {CLIENT_KEY}",
        "api-key": CLIENT_KEY,
        "X-Workspace-Id": "ws-spoofed",
        "X-Org-Id": "org-spoofed",
        "X-Organization-Id": "org-spoofed",
        "X-Api-Key-Id": "key-spoofed",
        "OpenAI-Organization": "org-spoofed",
        "OpenAI-Project": "proj-spoofed",
        "Content-Type": "application/json",
        "User-Agent": "client-agent/1.0",
        "x-custom": "passes",
        "x-request-id": "client-chosen",
    }
    target = URL(proxy.url + "/echo?a=1&b=%2F&c=x%26y%20z", encoded=True)
    async with client.post(target, data=b'{"model": "m"}', headers=sent) as resp:
        assert resp.status == 200
        assert resp.headers["x-request-id"] == "rid-1"
    got = seen_headers(seen)
    assert got.getall("authorization") == [f"Bearer {UPSTREAM_KEY}"]
    for name in (
        "api-key",
        "x-workspace-id",
        "x-org-id",
        "x-organization-id",
        "x-api-key-id",
        "openai-organization",
        "openai-project",
    ):
        assert name not in got
    assert all(CLIENT_KEY not in v for _, v in seen.requests[-1]["headers"])
    assert all("spoofed" not in v for _, v in seen.requests[-1]["headers"])
    assert got.getall("x-request-id") == ["rid-1"]
    assert got["user-agent"] == "client-agent/1.0"
    assert got["x-custom"] == "passes"
    assert got["content-type"] == "application/json"
    assert seen.requests[-1]["path_qs"] == "/echo?a=1&b=%2F&c=x%26y%20z"
    assert seen.requests[-1]["body"] == '{"model": "m"}'


async def test_no_headers_invented_for_the_client(
    make_proxy: MakeProxy, upstream_url: str, seen: Sightings
) -> None:
    proxy = await make_proxy(upstream_url)
    host_port = proxy.url.removeprefix("http://")
    reader, writer = await asyncio.open_connection(*host_port.split(":"))
    writer.write(f"GET /echo HTTP/1.1\r\nHost: {host_port}\r\nConnection: close\r\n\r\n".encode())
    await asyncio.wait_for(reader.read(), DEADLINE)
    writer.close()
    got = seen_headers(seen)
    for name in ("user-agent", "accept", "accept-encoding", "content-type", "cookie"):
        assert name not in got


async def test_hop_by_hop_dropped_on_the_way_up(
    make_proxy: MakeProxy, upstream_url: str, seen: Sightings, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(upstream_url)
    sent = CIMultiDict(
        [
            ("Connection", "keep-alive, x-client-hop"),
            ("Connection", "X-Other-Hop"),
            ("x-client-hop", "1"),
            ("x-other-hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("Proxy-Authorization", "Basic c2VjcmV0"),
            ("TE", "trailers"),
            ("Trailer", "x-trailer"),
            ("Upgrade", "h2c"),
            ("x-end-to-end", "kept"),
        ]
    )
    async with client.post(proxy.url + "/echo", data=b"{}", headers=sent) as resp:
        assert resp.status == 200
    got = seen_headers(seen)
    for name in (
        "x-client-hop",
        "x-other-hop",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
        "transfer-encoding",
    ):
        assert name not in got, name
    assert got.get("connection", "keep-alive") == "keep-alive"
    assert got["x-end-to-end"] == "kept"
    assert got["content-length"] == "2"


async def test_status_headers_and_json_capture_pass_through(
    make_proxy: MakeProxy, upstream_url: str, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(upstream_url)
    async with client.post(proxy.url + "/v1/chat", json={"model": "m"}) as resp:
        body = await resp.read()
        assert resp.status == 201
        assert resp.headers["x-upstream-note"] == "kept"
        assert resp.headers["x-request-id"] == "rid-1"
        assert resp.content_type == "application/json"
        for name in (FLAG_HEADER, "x-upstream-hop", "keep-alive", "proxy-authenticate"):
            assert name not in resp.headers, name
        assert "x-upstream-hop" not in resp.headers.get("connection", "")
    assert proxy.flags == ["cyber;severity=2"]
    (result,) = proxy.results
    assert result.completed
    assert result.status == 201
    assert not result.is_stream
    assert result.captured == body
    assert json.loads(result.captured)["usage"]["completion_tokens"] == 5
    assert result.bytes_sent == len(body)
    assert 0 <= result.ttfb_seconds < DEADLINE


async def test_body_over_capture_limit_streams_and_only_its_tail_is_kept(
    make_proxy: MakeProxy, upstream_url: str, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(upstream_url, capture_limit=1000)
    async with client.get(proxy.url + "/big") as resp:
        body = await resp.read()
    assert len(body) > 5000
    (result,) = proxy.results
    assert result.completed and result.bytes_sent == len(body)
    assert not result.capture_whole
    assert body.endswith(result.captured) and len(result.captured) == min(len(body), TAIL_BYTES)


async def test_gzip_body_passes_untouched(
    make_proxy: MakeProxy, upstream_url: str, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(upstream_url)
    async with client.get(proxy.url + "/gzip", headers={"Accept-Encoding": "gzip"}) as resp:
        raw = await resp.read()
        assert resp.headers["content-encoding"] == "gzip"
        assert resp.headers["content-length"] == str(len(raw))
    assert raw == GZIP_BODY


async def test_sse_first_chunk_reaches_client_before_second_is_sent(
    make_proxy: MakeProxy, upstream_url: str, seen: Sightings, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(upstream_url)
    async with client.get(proxy.url + "/sse") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), DEADLINE)
        assert first == b'data: {"n": 1}\n\n'
        assert not seen.release_second.is_set()
        seen.release_second.set()
        rest = await asyncio.wait_for(resp.content.read(), DEADLINE)
    assert rest.endswith(b"data: [DONE]\n\n")
    await poll(lambda: bool(proxy.results))
    (result,) = proxy.results
    assert result.is_stream and result.completed
    assert result.captured == first + rest
    assert result.bytes_sent == len(first + rest)


async def test_sse_capture_keeps_a_bounded_tail_of_whole_events(
    make_proxy: MakeProxy, upstream_url: str, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(upstream_url)
    async with client.get(proxy.url + "/sse-long") as resp:
        body = await resp.read()
    assert len(body) > 3 * SSE_CAPTURE_BYTES
    (result,) = proxy.results
    captured = result.captured
    assert 0 < len(captured) <= SSE_CAPTURE_BYTES
    assert body.endswith(captured)
    assert captured.startswith(b"data: ")
    assert captured.endswith(b'data: {"usage": {"completion_tokens": 9}}\n\ndata: [DONE]\n\n')


@pytest.mark.parametrize("trusted", [False, True])
async def test_forwarding_headers_appended_only_from_trusted_peers(
    make_proxy: MakeProxy,
    upstream_url: str,
    seen: Sightings,
    client: aiohttp.ClientSession,
    trusted: bool,
) -> None:
    networks = (ip_network("127.0.0.0/8"),) if trusted else (ip_network("10.0.0.0/8"),)
    proxy = await make_proxy(upstream_url, trusted=networks)
    host = proxy.url.removeprefix("http://")
    sent = CIMultiDict(
        [
            ("X-Forwarded-For", "203.0.113.9"),
            ("X-Forwarded-For", "198.51.100.7"),
            ("Forwarded", "for=203.0.113.9;proto=https"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "public.example"),
            ("X-Real-IP", "203.0.113.9"),
        ]
    )
    async with client.get(proxy.url + "/echo", headers=sent) as resp:
        assert resp.status == 200
    got = seen_headers(seen)
    ours = f'for=127.0.0.1;host="{host}";proto=http'
    if trusted:
        assert got.getall("x-forwarded-for") == ["203.0.113.9, 198.51.100.7, 127.0.0.1"]
        assert got.getall("forwarded") == [f"for=203.0.113.9;proto=https, {ours}"]
        assert got["x-forwarded-proto"] == "https"
        assert got["x-forwarded-host"] == "public.example"
        assert got["x-real-ip"] == "203.0.113.9"
    else:
        assert got.getall("x-forwarded-for") == ["127.0.0.1"]
        assert got.getall("forwarded") == [ours]
        assert got.getall("x-forwarded-proto") == ["http"]
        assert got.getall("x-forwarded-host") == [host]
        assert "x-real-ip" not in got


def test_forwarded_quotes_ipv6_and_honours_ipv4_mapped_trust() -> None:
    incoming = CIMultiDictProxy(CIMultiDict([("X-Forwarded-For", "203.0.113.9")]))
    out = upstream_request_headers(
        incoming,
        peer="2001:db8::1",
        trusted_proxies=(ip_network("10.0.0.0/8"),),
        upstream_api_key=None,
        request_id="r",
        host="h",
        scheme="https",
    )
    assert out["forwarded"] == 'for="[2001:db8::1]";host="h";proto=https'
    assert out["x-forwarded-for"] == "2001:db8::1"
    assert "authorization" not in out
    mapped = upstream_request_headers(
        incoming,
        peer="::ffff:10.1.2.3",
        trusted_proxies=(ip_network("10.0.0.0/8"),),
        upstream_api_key=None,
        request_id="r",
        host=None,
    )
    assert mapped["x-forwarded-for"] == "203.0.113.9, ::ffff:10.1.2.3"


def test_downstream_headers_drop_hop_by_hop_named_and_stripped() -> None:
    upstream = CIMultiDictProxy(
        CIMultiDict(
            [
                ("Connection", "close, X-Named"),
                ("X-Named", "1"),
                ("Transfer-Encoding", "chunked"),
                ("Content-Length", "10"),
                ("Trailer", "x-t"),
                ("Upgrade", "h2c"),
                (FLAG_HEADER, "cyber"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
            ]
        )
    )
    out = downstream_response_headers(upstream, strip=frozenset({FLAG_HEADER}))
    assert list(out.items()) == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]
    unchunked = CIMultiDictProxy(CIMultiDict([("Content-Length", "10")]))
    assert downstream_response_headers(unchunked, strip=frozenset()) == {"Content-Length": "10"}


async def test_upstream_refused_is_502(
    make_proxy: MakeProxy, client: aiohttp.ClientSession
) -> None:
    with socket.socket() as bound_not_listening:
        bound_not_listening.bind(("127.0.0.1", 0))
        port = bound_not_listening.getsockname()[1]
        proxy = await make_proxy(f"http://127.0.0.1:{port}")
        async with client.post(proxy.url + "/v1/chat", json={}) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["code"] == "upstream_unavailable"


async def test_connect_timeout_is_504(make_proxy: MakeProxy, client: aiohttp.ClientSession) -> None:
    # A listener whose accept queue is full drops new SYNs, so connects hang.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE):
            proxy = await make_proxy(
                f"http://127.0.0.1:{port}",
                timeouts=Timeouts(connect_s=0.2, first_byte_s=5.0, idle_s=5.0),
            )
            started = time.monotonic()
            async with client.get(proxy.url + "/x") as resp:
                assert resp.status == 504
                assert (await resp.json())["error"]["code"] == "upstream_timeout"
            assert 0.2 <= time.monotonic() - started < 2.0


async def test_first_byte_timeout_is_504_and_closes_upstream(
    make_proxy: MakeProxy, upstream_url: str, seen: Sightings, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(
        upstream_url, timeouts=Timeouts(connect_s=5.0, first_byte_s=0.2, idle_s=5.0)
    )
    started = time.monotonic()
    async with client.post(proxy.url + "/never", json={}) as resp:
        assert resp.status == 504
        assert (await resp.json())["error"]["code"] == "upstream_timeout"
    assert 0.2 <= time.monotonic() - started < 2.0
    await poll(lambda: bool(seen.closed))


async def test_idle_timeout_truncates_the_client_response(
    make_proxy: MakeProxy, upstream_url: str, seen: Sightings, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(
        upstream_url, timeouts=Timeouts(connect_s=5.0, first_byte_s=5.0, idle_s=0.2)
    )
    async with client.get(proxy.url + "/stall") as resp:
        assert resp.status == 200
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), DEADLINE)
        assert first == b'data: {"n": 1}\n\n'
        started = time.monotonic()
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.content.read(), DEADLINE)
        assert 0.1 <= time.monotonic() - started < 2.0
    await poll(lambda: bool(seen.closed))
    await poll(lambda: bool(proxy.results))
    assert not proxy.results[0].completed


async def test_timeouts_are_independent(
    make_proxy: MakeProxy, upstream_url: str, client: aiohttp.ClientSession
) -> None:
    # A head slower than idle_s and connect_s is fine while under first_byte_s.
    proxy = await make_proxy(
        upstream_url, timeouts=Timeouts(connect_s=0.1, first_byte_s=2.0, idle_s=0.1)
    )
    async with client.get(proxy.url + "/late-head") as resp:
        assert resp.status == 200
        assert await resp.json() == {"late": True}
    # A body longer than first_byte_s is fine while every gap is under idle_s.
    proxy = await make_proxy(
        upstream_url, timeouts=Timeouts(connect_s=5.0, first_byte_s=0.1, idle_s=2.0)
    )
    async with client.get(proxy.url + "/slow-chunks") as resp:
        assert resp.status == 200
        assert await resp.read() == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\n"
    assert proxy.results[-1].completed


async def _open_raw(proxy_url: str, request: bytes) -> tuple[asyncio.StreamReader, Any]:
    host, port = proxy_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    return reader, writer


@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_client_abort_mid_stream_closes_upstream_at_once(
    make_proxy: MakeProxy, upstream_url: str, seen: Sightings, handler_cancellation: bool
) -> None:
    # Without handler cancellation the next failed write notices; the upstream ticks every 10 ms.
    path = "/stall" if handler_cancellation else "/ticks"
    proxy = await make_proxy(upstream_url, handler_cancellation=handler_cancellation)
    reader, writer = await _open_raw(
        proxy.url, f"GET {path} HTTP/1.1\r\nHost: proxy\r\n\r\n".encode()
    )
    await asyncio.wait_for(reader.readuntil(b"data: "), DEADLINE)
    await poll(lambda: bool(seen.started))
    aborted = time.monotonic()
    writer.close()
    await poll(lambda: bool(seen.closed))
    assert seen.closed[0] - aborted < 0.1
    if not handler_cancellation:
        await poll(lambda: bool(proxy.results))
        assert not proxy.results[0].completed


async def test_client_abort_while_waiting_for_first_byte_closes_upstream_at_once(
    make_proxy: MakeProxy, upstream_url: str, seen: Sightings
) -> None:
    proxy = await make_proxy(upstream_url)
    body = b'{"model": "m"}'
    _reader, writer = await _open_raw(
        proxy.url,
        b"POST /never HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    await poll(lambda: bool(seen.started))
    aborted = time.monotonic()
    writer.close()
    await poll(lambda: bool(seen.closed))
    assert seen.closed[0] - aborted < 0.1
    assert not proxy.results


SMUGGLING = {
    "cl+te": b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
    "te+cl": b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
    "cl-differ": b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    "cl-same": b"Content-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
    "cl-list": b"Content-Length: 4, 4\r\n\r\nabcd",
}


@pytest.mark.parametrize("case", sorted(SMUGGLING))
async def test_smuggling_framing_is_refused_with_400(
    make_proxy: MakeProxy, upstream_url: str, seen: Sightings, case: str
) -> None:
    proxy = await make_proxy(upstream_url)
    reader, writer = await _open_raw(
        proxy.url, b"POST /echo HTTP/1.1\r\nHost: proxy\r\n" + SMUGGLING[case]
    )
    answer = await asyncio.wait_for(reader.read(), DEADLINE)
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split(b" ")[1] == b"400"
    assert b"content-type: text/plain" in rest.lower()
    # Refused by the server's parser: neither the handler nor the upstream saw it.
    assert proxy.handled == []
    assert seen.requests == []


async def test_smuggling_check_defends_in_depth(
    make_proxy: MakeProxy, upstream_url: str, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(upstream_url)
    async with client.get(proxy.url + "/__smuggling_check") as resp:
        verdicts = await resp.json()
    assert verdicts["cl+te"] and verdicts["cl-cl"] and verdicts["cl-cl-same"]
    assert verdicts["cl"] is None and verdicts["te"] is None
