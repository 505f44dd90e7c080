"""Compressed answers (SPEC §10): the client gets the upstream's bytes as sent, while the meter
reads a decoded side copy; JSON bodies small and large, SSE streams flushed event by event, in
every coding; codings it cannot read are reported, never guessed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.config import Timeouts, Upstream
from proxy.dataplane.client import UpstreamPool
from proxy.dataplane.forward import ForwardResult, forward
from proxy.metering import Usage, extract_usage
from proxy.mock_upstream import Compression

CODINGS = ["gzip", "deflate", "br", "zstd", "gzip, br"]
TIMEOUTS = Timeouts(connect_s=5.0, first_byte_s=10.0, idle_s=10.0)
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 4}}
METERED = Usage(input=7, cached_input=4, cache_write=0, output=7)


def json_body(pad: int) -> bytes:
    return json.dumps({"id": "c1", "pad": "x" * pad, "usage": USAGE}).encode()


def sse_events(n: int) -> list[bytes]:
    events = [
        f'data: {{"choices":[{{"delta":{{"content":"w{i}"}}}}],"usage":null}}\n\n'.encode()
        for i in range(n)
    ]
    events.append(b'data: {"choices":[],"usage":' + json.dumps(USAGE).encode() + b"}\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


@dataclass
class Rig:
    url: str
    results: list[ForwardResult] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)  # what the upstream wrote, per answer


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    rig = Rig("")

    async def json_answer(request: web.Request) -> web.StreamResponse:
        coding, pad = request.match_info["coding"], int(request.match_info["pad"])
        raw = json_body(pad)
        encoded = Compression(coding.split(",")).whole(raw) if coding != "plain" else raw
        if request.query.get("header"):
            coding = request.query["header"]
        rig.sent.append(encoded)
        headers = {"Content-Type": "application/json", "Content-Encoding": coding}
        if len(encoded) < 60_000:
            return web.Response(body=encoded, headers=headers)
        resp = web.StreamResponse(headers=headers)  # chunked, no length
        await resp.prepare(request)
        for at in range(0, len(encoded), 7000):
            await resp.write(encoded[at : at + 7000])
        await resp.write_eof()
        return resp

    async def sse_answer(request: web.Request) -> web.StreamResponse:
        coding = request.match_info["coding"]
        compression = Compression(coding.split(","))
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Content-Encoding": coding}
        )
        await resp.prepare(request)
        sent = b""
        for event in sse_events(int(request.query.get("n", "5"))):
            piece = compression.piece(event)
            sent += piece
            await resp.write(piece)
        tail = compression.end()
        await resp.write(tail)
        rig.sent.append(sent + tail)
        await resp.write_eof()
        return resp

    upstream = web.Application()
    upstream.router.add_get("/json/{coding}/{pad}", json_answer)
    upstream.router.add_get("/sse/{coding}", sse_answer)
    up_runner = web.AppRunner(upstream, access_log=None)
    await up_runner.setup()
    await web.TCPSite(up_runner, "127.0.0.1", 0).start()
    target = Upstream("t", f"http://127.0.0.1:{up_runner.addresses[0][1]}", None, TIMEOUTS)
    pool = UpstreamPool()

    async def handle(request: web.Request) -> web.StreamResponse:
        result = await forward(
            request,
            pool=pool,
            upstream=target,
            url_path=request.raw_path.replace("/hide", ""),
            body=b"",
            headers=CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() != "host"),
            extra_response_headers=None,
            strip_response_headers=frozenset(),
            on_upstream_headers=None,
            hide_usage=request.path.startswith("/hide"),
        )
        rig.results.append(result)
        return result.response

    proxy = web.Application()
    proxy.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(proxy, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    rig.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield rig
    finally:
        await pool.close()
        await runner.cleanup()
        await up_runner.cleanup()


Get = Callable[[str], Awaitable[tuple[int, CIMultiDict[str], bytes]]]


@pytest.fixture
async def get() -> AsyncIterator[Get]:
    async with aiohttp.ClientSession(auto_decompress=False) as client:

        async def go(url: str) -> tuple[int, CIMultiDict[str], bytes]:
            async with client.get(url, headers={"Accept-Encoding": "gzip, deflate, br, zstd"}) as r:
                return r.status, CIMultiDict(r.headers), await r.read()

        yield go


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("pad", [10, 3_000_000])
async def test_compressed_json_is_relayed_as_sent_and_metered(
    rig: Rig, get: Get, coding: str, pad: int
) -> None:
    status, headers, body = await get(f"{rig.url}/json/{coding.replace(' ', '')}/{pad}")
    assert status == 200 and body == rig.sent[-1]
    assert headers["Content-Encoding"] == coding.replace(" ", "")
    (result,) = rig.results
    assert result.completed and result.capture_problem is None
    assert result.capture_whole == (pad < 1 << 20)
    assert len(result.captured) <= 1 << 20
    assert extract_usage(result.captured, False, result.capture_whole) == METERED


@pytest.mark.parametrize("coding", CODINGS)
async def test_compressed_sse_is_relayed_as_sent_and_metered(
    rig: Rig, get: Get, coding: str
) -> None:
    status, _, body = await get(f"{rig.url}/sse/{coding.replace(' ', '')}?n=3000")
    assert status == 200 and body == rig.sent[-1]
    (result,) = rig.results
    assert result.is_stream and result.capture_problem is None
    assert result.captured.endswith(b"data: [DONE]\n\n")
    assert extract_usage(result.captured, True) == METERED


@pytest.mark.parametrize("coding", CODINGS)
async def test_a_hidden_usage_stream_goes_out_decoded_and_edited(
    rig: Rig, get: Get, coding: str
) -> None:
    status, headers, body = await get(f"{rig.url}/hide/sse/{coding.replace(' ', '')}?n=4")
    assert status == 200
    assert "Content-Encoding" not in headers
    expected = [e.replace(b',"usage":null', b"") for e in sse_events(4)]
    del expected[-2]  # the usage-only chunk
    assert body == b"".join(expected)
    (result,) = rig.results
    assert extract_usage(result.captured, True) == METERED


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/json/plain/10?header=compress", "encoding"),  # a coding nobody decodes
        ("/json/plain/10?header=gzip", "encoding"),  # says gzip, is not
        ("/json/gzip/10?header=br", "encoding"),  # the wrong decoder
    ],
)
async def test_unreadable_codings_are_reported_and_the_bytes_still_go_through(
    rig: Rig, get: Get, path: str, problem: str
) -> None:
    status, _, body = await get(rig.url + path)
    assert status == 200 and body == rig.sent[-1]
    (result,) = rig.results
    assert result.completed and result.capture_problem == problem and result.captured == b""
