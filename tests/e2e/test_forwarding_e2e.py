"""Forwarding through the real proxy process (SPEC §3.2, §3.5, §6): credentials and header
hygiene both ways, forwarding headers, SSE relayed chunk by chunk, upstream cancellation when the
client goes away, request-smuggling defences and the stripped safety-flag header.

Raw sockets are used where an HTTP client library would rewrite what is under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from typing import Any

import aiohttp

from tests.conftest import wait_until
from tests.e2e.conftest import (
    UPSTREAM_SECRET,
    Seeder,
    Stack,
    assert_allowed,
    chat_body,
    head_headers,
    header_values,
    mock_disconnects,
    mock_requests,
    raw_exchange,
    request,
)

MODEL = "gpt-4o-mini"  # in no program: any active workspace may use it
DISCONNECT_LIMIT_S = 1.0


async def _recorded(http: aiohttp.ClientSession, stack: Stack, rid: str) -> dict[str, Any]:
    found = await mock_requests(http, stack.mock.url, rid)
    assert len(found) == 1, found
    return found[0]


async def test_client_key_and_identity_claims_never_reach_the_upstream(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await seed.tenant()
    claims = {
        "x-workspace-id": "ws-someone-else",
        "x-org-id": "org-someone-else",
        "x-organization-id": "org-someone-else",
        "openai-organization": "org-someone-else",
    }
    for api_key_header in (False, True):
        answer = await request(
            http,
            stack.proxy.data_url,
            key=tenant.key,
            model=MODEL,
            headers=claims,
            api_key_header=api_key_header,
        )
        assert_allowed(answer)
        seen = await _recorded(http, stack, answer.headers["x-request-id"])
        assert header_values(seen, "authorization") == [f"Bearer {UPSTREAM_SECRET}"]
        assert header_values(seen, "api-key") == []
        for name in claims:
            assert header_values(seen, name) == [], name
        everything = json.dumps(seen)
        assert tenant.key not in everything
        assert tenant.key_id not in everything
        # The proxy forwards its request id so both sides name the exchange alike.
        assert header_values(seen, "x-request-id") == [answer.headers["x-request-id"]]
        assert json.loads(seen["body"]) == chat_body(MODEL)


async def test_hop_by_hop_request_headers_are_dropped(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await seed.tenant()
    body = json.dumps(chat_body(MODEL)).encode()
    raw = (
        b"POST /v1/chat/completions HTTP/1.1\r\n"
        b"Host: proxy.test\r\n"
        b"Authorization: Bearer " + tenant.key.encode() + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"Connection: close, X-Drop-Me\r\n"
        b"X-Drop-Me: secret-hop\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Trailer: x-checksum\r\n"
        b"Proxy-Authorization: Basic c2VjcmV0\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"X-End-To-End: kept\r\n"
        b"\r\n" + body
    )
    status, head, _ = await raw_exchange(stack.proxy.data_port, raw)
    assert status == 200, head
    rid = head_headers(head)["x-request-id"][0]
    seen = await _recorded(http, stack, rid)
    for name in (
        "x-drop-me",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
        "transfer-encoding",
    ):
        assert header_values(seen, name) == [], name
    assert all("x-drop-me" not in v.lower() for v in header_values(seen, "connection"))
    assert "secret-hop" not in json.dumps(seen["headers"])
    assert header_values(seen, "x-end-to-end") == ["kept"]
    assert json.loads(seen["body"]) == chat_body(MODEL)


async def test_hop_by_hop_response_headers_are_dropped(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await seed.tenant()
    upstream_headers = [
        ["Connection", "X-Upstream-Hop"],
        ["X-Upstream-Hop", "secret-hop"],
        ["Keep-Alive", "timeout=5"],
        ["Proxy-Authenticate", "Basic realm=upstream"],
        ["Trailer", "x-checksum"],
        ["X-Upstream-Kept", "yes"],
    ]
    knob = {"x-mock-response-headers": json.dumps(upstream_headers)}
    # The mock does send them when asked directly.
    async with http.post(
        stack.mock.url + "/v1/chat/completions", json=chat_body(MODEL), headers=knob
    ) as direct:
        assert direct.headers.get("X-Upstream-Hop") == "secret-hop"
        assert direct.headers.get("Proxy-Authenticate") == "Basic realm=upstream"

    answer = await request(http, stack.proxy.data_url, key=tenant.key, model=MODEL, headers=knob)
    assert_allowed(answer)
    for name in ("x-upstream-hop", "keep-alive", "proxy-authenticate", "trailer"):
        assert name not in answer.headers, (name, answer.headers)
    assert "x-upstream-hop" not in answer.headers.get("connection", "").lower()
    assert answer.headers.get("x-upstream-kept") == "yes"

    # Streaming answers get the same treatment.
    streaming = chat_body(MODEL, stream=True)
    answer = await request(
        http, stack.proxy.data_url, key=tenant.key, json_body=streaming, headers=knob
    )
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    for name in ("x-upstream-hop", "keep-alive", "proxy-authenticate", "trailer"):
        assert name not in answer.headers, (name, answer.headers)
    assert answer.headers.get("x-upstream-kept") == "yes"


async def test_forwarded_for_is_the_real_peer(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await seed.tenant()
    spoofed = {
        "X-Forwarded-For": "6.6.6.6",
        "Forwarded": "for=6.6.6.6;proto=https",
        "X-Real-IP": "6.6.6.6",
        "X-Forwarded-Host": "evil.test",
    }
    answer = await request(http, stack.proxy.data_url, key=tenant.key, model=MODEL, headers=spoofed)
    assert_allowed(answer)
    seen = await _recorded(http, stack, answer.headers["x-request-id"])
    assert header_values(seen, "x-forwarded-for") == ["127.0.0.1"]
    (forwarded,) = header_values(seen, "forwarded")
    assert forwarded.startswith("for=127.0.0.1;"), forwarded
    assert "6.6.6.6" not in json.dumps(seen["headers"])
    assert "evil.test" not in json.dumps(seen["headers"])


async def test_sse_is_relayed_chunk_by_chunk(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await seed.tenant()
    delay = 0.3
    chunks = 4  # the mock sends chunks + finish + [DONE] events, `delay` apart
    started = time.monotonic()
    arrivals: list[float] = []
    buffer = b""
    async with http.post(
        stack.proxy.data_url + "/v1/chat/completions",
        json=chat_body(MODEL, stream=True),
        headers={
            "Authorization": f"Bearer {tenant.key}",
            "x-mock-chunk-delay-ms": str(int(delay * 1000)),
            "x-mock-chunks": str(chunks),
        },
    ) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers.get("x-request-id")
        async for data in resp.content.iter_any():
            buffer += data
            while b"\n\n" in buffer:
                _, buffer = buffer.split(b"\n\n", 1)
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) == chunks + 2, arrivals
    total_delay = delay * (chunks + 1)
    spread = arrivals[-1] - arrivals[0]
    print(f"\nSSE arrivals (s after request): {[round(a, 3) for a in arrivals]}")
    # Buffering the stream would deliver every event at the end, all at once.
    assert spread >= total_delay * 0.6, arrivals
    assert arrivals[0] <= arrivals[-1] - 2 * delay, arrivals
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert sum(g >= delay / 2 for g in gaps) >= 3, gaps


async def _wait_disconnect(http: aiohttp.ClientSession, stack: Stack, rid: str) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def recorded() -> bool:
        found.update(await mock_disconnects(http, stack.mock.url))
        return rid in found

    await wait_until(recorded, timeout=5.0, interval=0.01, message=f"disconnect of {rid}")
    disconnect: dict[str, Any] = found[rid]
    return disconnect


async def test_client_disconnect_mid_stream_cancels_the_upstream(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await seed.tenant()
    chunks = 40
    resp = await http.post(
        stack.proxy.data_url + "/v1/chat/completions",
        json=chat_body(MODEL, stream=True),
        headers={
            "Authorization": f"Bearer {tenant.key}",
            "x-mock-chunk-delay-ms": "300",
            "x-mock-chunks": str(chunks),
        },
    )
    try:
        assert resp.status == 200
        rid = resp.headers["x-request-id"]
        first = await resp.content.readuntil(b"\n\n")
        assert first.startswith(b"data: ")
    finally:
        closed_at = time.monotonic()
        resp.close()
    disconnect = await _wait_disconnect(http, stack, rid)
    delay = disconnect["monotonic"] - closed_at
    print(f"\nupstream saw the mid-stream disconnect {delay * 1000:.1f} ms after the client left")
    assert disconnect["phase"] == "stream"
    assert disconnect["events_sent"] < chunks
    assert delay < DISCONNECT_LIMIT_S, delay


async def test_client_disconnect_during_slow_first_byte_cancels_the_upstream(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await seed.tenant()
    trace = uuid.uuid4().hex
    body = json.dumps(chat_body(MODEL)).encode()
    raw = (
        b"POST /v1/chat/completions HTTP/1.1\r\n"
        b"Host: proxy.test\r\n"
        b"Authorization: Bearer " + tenant.key.encode() + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"x-mock-first-byte-delay-ms: 20000\r\n"
        b"x-e2e-trace: " + trace.encode() + b"\r\n"
        b"\r\n" + body
    )
    _, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.data_port)
    rid = ""
    try:
        writer.write(raw)
        await writer.drain()

        async def arrived_upstream() -> bool:
            nonlocal rid
            for seen in await mock_requests(http, stack.mock.url):
                if header_values(seen, "x-e2e-trace") == [trace]:
                    rid = seen["request_id"]
                    return True
            return False

        await wait_until(arrived_upstream, timeout=5.0, interval=0.01)
    finally:
        closed_at = time.monotonic()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    disconnect = await _wait_disconnect(http, stack, rid)
    delay = disconnect["monotonic"] - closed_at
    print(f"\nupstream saw the first-byte disconnect {delay * 1000:.1f} ms after the client left")
    assert disconnect["phase"] == "first_byte"
    assert delay < DISCONNECT_LIMIT_S, delay


async def test_ambiguous_framing_is_refused(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await seed.tenant()
    body = json.dumps(chat_body(MODEL)).encode()
    size = str(len(body)).encode()
    trace = uuid.uuid4().hex.encode()
    common = (
        b"POST /v1/chat/completions HTTP/1.1\r\n"
        b"Host: proxy.test\r\n"
        b"Authorization: Bearer " + tenant.key.encode() + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"Connection: close\r\n"
        b"x-e2e-trace: " + trace + b"\r\n"
    )
    chunked = hex(len(body))[2:].encode() + b"\r\n" + body + b"\r\n0\r\n\r\n"
    attempts = {
        "CL+TE": common
        + b"Content-Length: "
        + size
        + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked,
        "TE+CL": common
        + b"Transfer-Encoding: chunked\r\nContent-Length: "
        + size
        + b"\r\n\r\n"
        + chunked,
        "conflicting CL": common
        + b"Content-Length: "
        + size
        + b"\r\nContent-Length: "
        + str(len(body) - 5).encode()
        + b"\r\n\r\n"
        + body,
        "CL list": common + b"Content-Length: " + size + b", 5\r\n\r\n" + body,
    }
    for what, raw in attempts.items():
        status, head, payload = await raw_exchange(stack.proxy.data_port, raw)
        assert status == 400, (what, head)
        assert head_headers(head).get("x-request-id"), (what, head)
        error = json.loads(payload)["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_request")
    # None of them reached the upstream.
    for seen in await mock_requests(http, stack.mock.url):
        assert header_values(seen, "x-e2e-trace") != [trace.decode()]
    # The same request with unambiguous framing goes through.
    plain = common + b"Content-Length: " + size + b"\r\n\r\n" + body
    status, head, _ = await raw_exchange(stack.proxy.data_port, plain)
    assert status == 200, head


async def test_safety_flag_header_is_stripped(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await seed.tenant()
    knob = {"x-mock-safety-flag": "cyber;severity=1"}
    async with http.post(
        stack.mock.url + "/v1/chat/completions", json=chat_body(MODEL), headers=knob
    ) as direct:
        assert direct.headers.get("x-safety-flag") == "cyber;severity=1"
    for payload in (chat_body(MODEL), chat_body(MODEL, stream=True)):
        answer = await request(
            http, stack.proxy.data_url, key=tenant.key, json_body=payload, headers=knob
        )
        assert answer.status == 200
        assert answer.headers.get("x-request-id")
        assert "x-safety-flag" not in answer.headers, answer.headers
