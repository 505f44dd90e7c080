"""The mock upstream on loopback: OpenAI shapes (checked by the official SDK), SSE, usage, every
knob, request recording, and disconnects noticed during a slow first byte and mid-stream."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import openai
import pytest

from proxy.mock_upstream import DEFAULT_MODELS, DEFAULT_REPLY, MockUpstream, run_forever

REPLY_WORDS = len(DEFAULT_REPLY.split())
CHAT_BODY: dict[str, Any] = {
    "model": "gpt-5.6-sol",
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello there  world"}]},
    ],
}
CHAT_PROMPT_WORDS = 5

T = TypeVar("T")


async def poll(probe: Callable[[], Awaitable[T | None]], timeout: float = 5.0) -> T:
    """The first truthy result of ``probe``; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = await probe()
        if outcome:
            return outcome
        if time.monotonic() >= deadline:
            raise AssertionError(f"nothing within {timeout} s")
        await asyncio.sleep(0.005)


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) of each SSE event in ``text``."""
    events: list[tuple[str | None, str]] = []
    for block in text.split("\n\n"):
        if not block:
            continue
        name: str | None = None
        data: list[str] = []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        events.append((name, "\n".join(data)))
    return events


@pytest.fixture
async def upstream() -> AsyncIterator[MockUpstream]:
    server = MockUpstream()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def sdk(upstream: MockUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=upstream.base_url, api_key="sk-test", max_retries=0
    ) as client:
        yield client


async def post_json(
    http: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with http.post(url, json=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None), resp


async def post_text(
    http: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> tuple[aiohttp.ClientResponse, str]:
    async with http.post(url, json=body, headers=headers) as resp:
        return resp, await resp.text()


# shapes and usage


async def test_chat_json_answer_is_openai_shaped(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    status, answer, resp = await post_json(http, upstream.url + "/v1/chat/completions", CHAT_BODY)
    assert status == 200
    assert resp.content_type == "application/json"
    assert answer["id"].startswith("chatcmpl-")
    assert answer["object"] == "chat.completion"
    assert isinstance(answer["created"], int)
    assert answer["model"] == "gpt-5.6-sol"
    [choice] = answer["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == DEFAULT_REPLY
    assert choice["finish_reason"] == "stop"
    assert answer["usage"]["prompt_tokens"] == CHAT_PROMPT_WORDS
    assert answer["usage"]["completion_tokens"] == REPLY_WORDS
    assert answer["usage"]["total_tokens"] == CHAT_PROMPT_WORDS + REPLY_WORDS
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert answer["usage"]["prompt_tokens_details"]["cache_write_tokens"] == 0

    _, again, _ = await post_json(
        http, upstream.url + "/v1/chat/completions", {**CHAT_BODY, "model": "gpt-4o-mini"}
    )
    assert again["model"] == "gpt-4o-mini"
    assert again["id"] != answer["id"]


async def test_chat_stream_is_sse_ending_in_done(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    resp, text = await post_text(
        http,
        upstream.url + "/v1/chat/completions",
        {**CHAT_BODY, "stream": True},
        {"x-mock-chunks": "3"},
    )
    assert resp.status == 200
    assert resp.content_type == "text/event-stream"
    events = sse_events(text)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert len(chunks) == 3 + 1
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert all(chunk["model"] == "gpt-5.6-sol" for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert content == DEFAULT_REPLY
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert text.endswith("data: [DONE]\n\n")


async def test_chat_stream_include_usage_puts_usage_in_the_final_chunk(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    body = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}}
    _, text = await post_text(http, upstream.url + "/v1/chat/completions", body)
    events = sse_events(text)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    final = chunks[-1]
    assert final["choices"] == []
    assert final["usage"]["prompt_tokens"] == CHAT_PROMPT_WORDS
    assert final["usage"]["completion_tokens"] == REPLY_WORDS
    assert final["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 0,
        "cache_write_tokens": 0,
        "audio_tokens": 0,
    }
    assert all(chunk["usage"] is None for chunk in chunks[:-1])


async def test_responses_json_answer_has_output_and_usage(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    body = {"model": "gpt-5.6-luna", "input": "one two three", "instructions": "four"}
    status, answer, _ = await post_json(http, upstream.url + "/v1/responses", body)
    assert status == 200
    assert answer["object"] == "response"
    assert answer["id"].startswith("resp_")
    assert answer["model"] == "gpt-5.6-luna"
    assert answer["status"] == "completed"
    [item] = answer["output"]
    assert item["type"] == "message"
    assert item["content"][0] == {
        "type": "output_text",
        "text": DEFAULT_REPLY,
        "annotations": [],
        "logprobs": [],
    }
    assert answer["usage"]["input_tokens"] == 4
    assert answer["usage"]["output_tokens"] == REPLY_WORDS
    assert answer["usage"]["total_tokens"] == 4 + REPLY_WORDS
    assert answer["usage"]["input_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 0}


async def test_responses_stream_is_the_responses_event_stream(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    body = {
        "model": "gpt-5.6-terra",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "a b"}]}],
        "stream": True,
    }
    resp, text = await post_text(http, upstream.url + "/v1/responses", body, {"x-mock-chunks": "5"})
    assert resp.content_type == "text/event-stream"
    events = sse_events(text)
    kinds = [name for name, _ in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 5,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    datas = [json.loads(data) for _, data in events]
    assert [data["type"] for data in datas] == kinds
    assert [data["sequence_number"] for data in datas] == list(range(len(datas)))
    deltas = "".join(data["delta"] for data in datas if data["type"].endswith(".delta"))
    assert deltas == DEFAULT_REPLY
    completed = datas[-1]["response"]
    assert completed["status"] == "completed"
    assert completed["usage"]["input_tokens"] == 2
    assert completed["usage"]["output_tokens"] == REPLY_WORDS
    assert datas[0]["response"]["usage"] is None


async def test_models_list_and_lookup(upstream: MockUpstream, http: aiohttp.ClientSession) -> None:
    async with http.get(upstream.url + "/v1/models") as resp:
        listing = await resp.json()
    assert listing["object"] == "list"
    assert [model["id"] for model in listing["data"]] == list(DEFAULT_MODELS)
    assert all(model["object"] == "model" for model in listing["data"])
    async with http.get(upstream.url + "/v1/models/gpt-5.5-alpha") as resp:
        assert resp.status == 200
        assert (await resp.json())["id"] == "gpt-5.5-alpha"
    async with http.get(upstream.url + "/v1/models/gpt-0") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "model_not_found"

    custom = MockUpstream(models=["m-one", "m-two"])
    await custom.start()
    try:
        async with http.get(custom.url + "/v1/models") as resp:
            assert [model["id"] for model in (await resp.json())["data"]] == ["m-one", "m-two"]
    finally:
        await custom.stop()


async def test_bad_requests_get_openai_errors(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    async with http.post(upstream.url + "/v1/chat/completions", data=b"{not json") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    status, answer, _ = await post_json(http, upstream.url + "/v1/chat/completions", {"x": 1})
    assert status == 400
    assert "model" in answer["error"]["message"]
    async with http.get(upstream.url + "/v2/nothing") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "unknown_url"


# the official SDK


async def test_sdk_parses_chat_completion(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(
        model="gpt-5.6-sol", messages=[{"role": "user", "content": "hi there"}]
    )
    assert completion.model == "gpt-5.6-sol"
    assert completion.choices[0].message.content == DEFAULT_REPLY
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 2
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 0


async def test_sdk_parses_chat_stream(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="gpt-5.6-terra",
        messages=[{"role": "user", "content": "hi there"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    usage = None
    async for chunk in stream:
        assert chunk.model == "gpt-5.6-terra"
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == DEFAULT_REPLY
    assert usage is not None
    assert usage.completion_tokens == REPLY_WORDS


async def test_sdk_parses_responses(sdk: openai.AsyncOpenAI) -> None:
    response = await sdk.responses.create(model="gpt-5.6-luna", input="say something")
    assert response.output_text == DEFAULT_REPLY
    assert response.usage is not None
    assert response.usage.input_tokens == 2
    assert response.usage.input_tokens_details.cached_tokens == 0

    stream = await sdk.responses.create(model="gpt-5.6-luna", input="say something", stream=True)
    deltas: list[str] = []
    completed = None
    async for event in stream:
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type == "response.completed":
            completed = event.response
    assert "".join(deltas) == DEFAULT_REPLY
    assert completed is not None
    assert completed.usage is not None
    assert completed.usage.output_tokens == REPLY_WORDS


async def test_sdk_sees_status_knob_as_an_api_error(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        await sdk.chat.completions.create(
            model="gpt-5.6-sol",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-mock-status": "503"},
        )
    assert caught.value.status_code == 503


# knobs


async def test_status_knob_answers_an_openai_error(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    for status, kind in [
        (500, "server_error"),
        (429, "rate_limit_error"),
        (403, "permission_error"),
    ]:
        answer_status, answer, _ = await post_json(
            http,
            upstream.url + "/v1/chat/completions",
            {**CHAT_BODY, "stream": True},
            {"x-mock-status": str(status)},
        )
        assert answer_status == status
        assert answer["error"]["type"] == kind
    async with http.get(upstream.url + "/v1/models", headers={"x-mock-status": "502"}) as resp:
        assert resp.status == 502


async def test_usage_overrides(upstream: MockUpstream, http: aiohttp.ClientSession) -> None:
    overrides = {
        "x-mock-prompt-tokens": "1000",
        "x-mock-cached-tokens": "600",
        "x-mock-cache-write-tokens": "300",
        "x-mock-completion-tokens": "42",
    }
    _, chat, _ = await post_json(http, upstream.url + "/v1/chat/completions", CHAT_BODY, overrides)
    assert chat["usage"]["prompt_tokens"] == 1000
    assert chat["usage"]["completion_tokens"] == 42
    assert chat["usage"]["total_tokens"] == 1042
    assert chat["usage"]["prompt_tokens_details"]["cached_tokens"] == 600
    assert chat["usage"]["prompt_tokens_details"]["cache_write_tokens"] == 300

    body = {"model": "gpt-5.6-sol", "input": "x", "stream": True}
    _, text = await post_text(http, upstream.url + "/v1/responses", body, overrides)
    completed = json.loads(sse_events(text)[-1][1])["response"]
    assert completed["usage"]["input_tokens"] == 1000
    assert completed["usage"]["output_tokens"] == 42
    assert completed["usage"]["input_tokens_details"] == {
        "cached_tokens": 600,
        "cache_write_tokens": 300,
    }


async def test_safety_flag_header(upstream: MockUpstream, http: aiohttp.ClientSession) -> None:
    flag = {"x-mock-safety-flag": "cyber;severity=2"}
    _, _, resp = await post_json(http, upstream.url + "/v1/chat/completions", CHAT_BODY, flag)
    assert resp.headers["x-safety-flag"] == "cyber;severity=2"
    resp, _ = await post_text(
        http, upstream.url + "/v1/chat/completions", {**CHAT_BODY, "stream": True}, flag
    )
    assert resp.headers["x-safety-flag"] == "cyber;severity=2"
    _, _, resp = await post_json(http, upstream.url + "/v1/chat/completions", CHAT_BODY)
    assert "x-safety-flag" not in resp.headers

    flagging = MockUpstream(safety_flag="bio;severity=5", safety_flag_header="x-upstream-flag")
    await flagging.start()
    try:
        _, _, resp = await post_json(http, flagging.url + "/v1/responses", {"model": "m"})
        assert resp.headers["x-upstream-flag"] == "bio;severity=5"
        _, _, resp = await post_json(
            http, flagging.url + "/v1/responses", {"model": "m"}, {"x-mock-safety-flag": ""}
        )
        assert "x-upstream-flag" not in resp.headers
    finally:
        await flagging.stop()


async def test_extra_response_headers_including_hop_by_hop(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    extra = {"connection": "x-secret", "x-secret": "1", "keep-alive": "timeout=5"}
    _, _, resp = await post_json(
        http,
        upstream.url + "/v1/chat/completions",
        CHAT_BODY,
        {"x-mock-response-headers": json.dumps(extra)},
    )
    raw = {name.decode().lower(): value.decode() for name, value in resp.raw_headers}
    assert raw["connection"] == "x-secret"
    assert raw["x-secret"] == "1"
    assert raw["keep-alive"] == "timeout=5"

    pairs = [["x-dup", "a"], ["x-dup", "b"]]
    resp, _ = await post_text(
        http,
        upstream.url + "/v1/chat/completions",
        {**CHAT_BODY, "stream": True},
        {"x-mock-response-headers": json.dumps(pairs)},
    )
    assert resp.headers.getall("x-dup") == ["a", "b"]


async def test_reply_knob(upstream: MockUpstream, http: aiohttp.ClientSession) -> None:
    _, answer, _ = await post_json(
        http, upstream.url + "/v1/chat/completions", CHAT_BODY, {"x-mock-reply": "just three words"}
    )
    assert answer["choices"][0]["message"]["content"] == "just three words"
    assert answer["usage"]["completion_tokens"] == 3


async def test_bad_knobs_are_refused(upstream: MockUpstream, http: aiohttp.ClientSession) -> None:
    for headers in [
        {"x-mock-chunks": "0"},
        {"x-mock-chunks": "many"},
        {"x-mock-status": "700"},
        {"x-mock-chunk-delay-ms": "-1"},
        {"x-mock-response-headers": "[1, 2]"},
        {"x-mock-response-headers": '{"x-a": "line\\nbreak"}'},
        {"x-mock-colour": "blue"},
    ]:
        status, answer, _ = await post_json(
            http, upstream.url + "/v1/chat/completions", CHAT_BODY, headers
        )
        assert status == 400, headers
        assert answer["error"]["code"] == "invalid_mock_knob"


async def test_chunk_delay_spaces_the_events(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    started = time.monotonic()
    arrivals: list[float] = []
    async with http.post(
        upstream.url + "/v1/chat/completions",
        json={**CHAT_BODY, "stream": True},
        headers={"x-mock-chunks": "3", "x-mock-chunk-delay-ms": "60"},
    ) as resp:
        async for line in resp.content:
            if line.startswith(b"data: "):
                arrivals.append(time.monotonic() - started)
    # 3 content chunks, the finish chunk and [DONE]: four pauses.
    assert len(arrivals) == 5
    assert arrivals[-1] >= 4 * 0.060
    assert arrivals[-1] - arrivals[0] >= 3 * 0.060


async def test_first_byte_delay_holds_the_headers(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    for body in (CHAT_BODY, {**CHAT_BODY, "stream": True}):
        started = time.monotonic()
        async with http.post(
            upstream.url + "/v1/chat/completions",
            json=body,
            headers={"x-mock-first-byte-delay-ms": "150"},
        ) as resp:
            headers_after = time.monotonic() - started
            assert resp.status == 200
            await resp.read()
        assert headers_after >= 0.150


async def test_server_wide_defaults_and_per_request_override(http: aiohttp.ClientSession) -> None:
    server = MockUpstream(chunks=2, cached_tokens=7, status=500, response_headers=[("x-a", "1")])
    await server.start()
    try:
        status, _, resp = await post_json(http, server.url + "/v1/chat/completions", CHAT_BODY)
        assert status == 500
        assert resp.headers["x-a"] == "1"
        resp, text = await post_text(
            http,
            server.url + "/v1/chat/completions",
            {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}},
            {"x-mock-status": "200"},
        )
        assert resp.status == 200
        chunks = [json.loads(data) for _, data in sse_events(text)[:-1]]
        assert len(chunks) == 2 + 2
        assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 7
    finally:
        await server.stop()


# recording


async def test_requests_are_recorded_and_cleared(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    body = json.dumps(CHAT_BODY).encode()
    async with http.post(
        upstream.url + "/v1/chat/completions?trace=1",
        data=body,
        headers={"Content-Type": "application/json", "X-Request-Id": "rec-1", "X-Twice": "a"},
    ) as resp:
        assert resp.status == 200
    [recorded] = upstream.requests
    assert recorded.request_id == "rec-1"
    assert recorded.method == "POST"
    assert recorded.path == "/v1/chat/completions?trace=1"
    assert recorded.body == body
    assert recorded.json() == CHAT_BODY
    assert ("X-Request-Id", "rec-1") in recorded.headers
    assert recorded.header("x-twice") == "a"
    assert recorded.peer == "127.0.0.1"

    async with http.get(upstream.url + "/_mock/requests") as resp:
        [over_http] = (await resp.json())["requests"]
    assert over_http["path"] == "/v1/chat/completions?trace=1"
    assert over_http["body"] == body.decode()
    assert ["X-Twice", "a"] in over_http["headers"]
    assert over_http["peer"] == "127.0.0.1"
    async with http.get(upstream.url + "/_mock/requests?request_id=other") as resp:
        assert (await resp.json())["requests"] == []

    async with http.delete(upstream.url + "/_mock/requests") as resp:
        assert resp.status == 200
    assert upstream.requests == []
    async with http.get(upstream.url + "/_mock/requests") as resp:
        assert (await resp.json())["requests"] == []


async def test_recording_is_bounded(http: aiohttp.ClientSession) -> None:
    server = MockUpstream(max_recorded=3)
    await server.start()
    try:
        for index in range(5):
            headers = {"x-request-id": f"b-{index}"}
            async with http.get(server.url + "/v1/models", headers=headers) as resp:
                assert resp.status == 200
        assert [item.request_id for item in server.requests] == ["b-2", "b-3", "b-4"]
    finally:
        await server.stop()


# disconnects


async def open_raw_request(
    port: int, path: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
    await writer.drain()
    return reader, writer


async def fetch_disconnect(
    http: aiohttp.ClientSession, upstream: MockUpstream, request_id: str
) -> dict[str, Any] | None:
    async with http.get(upstream.url + "/_mock/disconnects") as resp:
        found: dict[str, Any] | None = (await resp.json())["disconnects"].get(request_id)
        return found


async def test_disconnect_during_slow_first_byte_is_recorded(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    _, writer = await open_raw_request(
        upstream.port,
        "/v1/chat/completions",
        CHAT_BODY,
        {"x-request-id": "slow-1", "x-mock-first-byte-delay-ms": "20000"},
    )

    async def received() -> bool:
        return any(item.request_id == "slow-1" for item in upstream.requests)

    await poll(received)
    closed_at = time.time()
    writer.close()
    await writer.wait_closed()

    async def disconnect() -> dict[str, Any] | None:
        return await fetch_disconnect(http, upstream, "slow-1")

    seen = await poll(disconnect)
    assert seen["phase"] == "first_byte"
    assert seen["events_sent"] == 0
    assert seen["path"] == "/v1/chat/completions"
    assert 0 <= seen["at"] - closed_at < 2.0
    assert upstream.disconnects["slow-1"].phase == "first_byte"

    status, _, _ = await post_json(http, upstream.url + "/v1/chat/completions", CHAT_BODY)
    assert status == 200


async def test_disconnect_mid_stream_is_recorded(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    reader, writer = await open_raw_request(
        upstream.port,
        "/v1/responses",
        {"model": "gpt-5.6-sol", "input": "hi", "stream": True},
        {"x-request-id": "mid-1", "x-mock-chunks": "200", "x-mock-chunk-delay-ms": "20"},
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"text/event-stream" in head.lower()
    first_event = await reader.readuntil(b"\n\n")
    assert b"response.created" in first_event
    closed_at = time.time()
    writer.transport.abort()

    disconnect = await upstream.wait_for_disconnect("mid-1", timeout=5.0)
    assert disconnect.phase == "stream"
    assert 1 <= disconnect.events_sent < 200
    assert 0 <= disconnect.at - closed_at < 2.0

    async def over_http() -> dict[str, Any] | None:
        return await fetch_disconnect(http, upstream, "mid-1")

    seen = await poll(over_http)
    assert seen["phase"] == "stream"

    async with http.delete(upstream.url + "/_mock/disconnects") as resp:
        assert resp.status == 200
    assert upstream.disconnects == {}


async def test_completed_exchanges_record_no_disconnect(
    upstream: MockUpstream, http: aiohttp.ClientSession
) -> None:
    headers = {"x-request-id": "whole-1", "x-mock-chunk-delay-ms": "5"}
    _, text = await post_text(
        http, upstream.url + "/v1/chat/completions", {**CHAT_BODY, "stream": True}, headers
    )
    assert text.endswith("data: [DONE]\n\n")
    assert await fetch_disconnect(http, upstream, "whole-1") is None


# running it


async def test_run_forever_serves_until_told_to_stop(http: aiohttp.ClientSession) -> None:
    ready: list[MockUpstream] = []
    stop = asyncio.Event()
    task = asyncio.create_task(run_forever(port=0, until=stop, on_ready=ready.append))

    async def started() -> bool:
        return bool(ready)

    await poll(started)
    async with http.get(ready[0].url + "/v1/models") as resp:
        assert resp.status == 200
    stop.set()
    await asyncio.wait_for(task, timeout=5.0)
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(ready[0].url + "/v1/models") as resp:
            await resp.read()


async def test_command_line_runs_and_stops_on_sigterm(http: aiohttp.ClientSession) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.mock_upstream",
        "--port",
        "0",
        "--chunks",
        "2",
        "--safety-flag",
        "cyber;severity=1",
        "--response-header",
        "x-from-cli: yes",
        "--models",
        "a,b",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=20.0)
        url = line.decode().strip().rsplit(" ", 1)[-1]
        assert url.startswith("http://127.0.0.1:")
        async with http.get(url + "/v1/models") as resp:
            assert [model["id"] for model in (await resp.json())["data"]] == ["a", "b"]
        resp, text = await post_text(
            http, url + "/v1/chat/completions", {**CHAT_BODY, "stream": True}
        )
        assert resp.headers["x-safety-flag"] == "cyber;severity=1"
        assert resp.headers["x-from-cli"] == "yes"
        assert len(sse_events(text)) == 2 + 1 + 1
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=10.0) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
