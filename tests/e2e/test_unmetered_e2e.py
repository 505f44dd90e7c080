"""Every answer metered or counted (SPEC §10) through a real proxy process: compressed answers in
every coding, chat streams that did not ask for usage (the client, the official ``openai`` SDK,
sees exactly the stream it would have seen without the proxy), embeddings and responses
streams, and the reasons of ``access_proxy_unmetered_answers_total``."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import openai
import pytest

from proxy.store.usage import usage_key
from tests.conftest import wait_until
from tests.e2e.conftest import (
    PREVIEW,
    Seeder,
    Stack,
    Tenant,
    chat_body,
    metric_samples,
    mock_requests,
    request,
)

SOL = "gpt-5.6-sol"
KNOBS = {"x-mock-prompt-tokens": "30", "x-mock-completion-tokens": "12"}


def unmetered(samples: list[tuple[str, dict[str, str], float]], reason: str) -> float:
    return sum(
        v
        for name, labels, v in samples
        if name == "access_proxy_unmetered_answers_total"
        and labels == {"program": PREVIEW, "reason": reason}
    )


async def usage_of(seed: Seeder, ws: str) -> dict[str, int]:
    raw = await seed.client.hgetall(usage_key(ws))
    return {k.decode(): int(float(v)) for k, v in raw.items() if b":" not in k}


async def wait_requests(seed: Seeder, ws: str, n: int) -> dict[str, int]:
    async def done() -> bool:
        return (await usage_of(seed, ws)).get("requests") == n

    await wait_until(done, timeout=15, message=f"{n} metered answers of {ws}")
    return await usage_of(seed, ws)


@pytest.fixture
async def raw() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that leaves bodies as the proxy sent them (no decompression)."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(auto_decompress=False, timeout=timeout) as session:
        yield session


async def test_compressed_answers_are_metered_in_every_coding(
    stack: Stack, seed: Seeder, raw: aiohttp.ClientSession
) -> None:
    http = raw
    tenant = await seed.tenant()
    await seed.grant(f"workspace:{tenant.workspace}")
    base = stack.proxy.data_url
    codings = ("gzip", "deflate", "br", "zstd")
    for coding in codings:
        headers = {**KNOBS, "x-mock-compress": coding, "Accept-Encoding": coding}
        plain = await request(http, base, key=tenant.key, model=SOL, headers=headers)
        assert plain.status == 200 and plain.headers["Content-Encoding"] == coding
        stream = chat_body(SOL, stream=True, stream_options={"include_usage": True})
        answer = await request(http, base, key=tenant.key, json_body=stream, headers=headers)
        assert answer.status == 200 and answer.headers["Content-Encoding"] == coding
        responses = {"model": SOL, "input": "hi", "stream": True}
        answer = await request(
            http, base, "/v1/responses", key=tenant.key, json_body=responses, headers=headers
        )
        assert answer.status == 200 and answer.headers["Content-Encoding"] == coding
    usage = await wait_requests(seed, tenant.workspace, 3 * len(codings))
    assert usage["input"] == 30 * 3 * len(codings) and usage["output"] == 12 * 3 * len(codings)


async def test_a_chat_stream_without_usage_is_metered_and_the_client_sees_no_usage(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await seed.tenant()
    await seed.grant(f"workspace:{tenant.workspace}")
    body = chat_body(SOL, stream=True, stream_options={"include_obfuscation": False})
    for coding in ("identity", "gzip"):
        headers = {**KNOBS, "x-mock-compress": coding} if coding != "identity" else KNOBS
        via_proxy = await request(
            http, stack.proxy.data_url, key=tenant.key, json_body=body, headers=headers
        )
        direct = await request(http, stack.mock.url, json_body=body, headers=KNOBS)
        assert via_proxy.status == direct.status == 200
        assert b"usage" not in via_proxy.body
        assert normalized(via_proxy.body) == normalized(direct.body)
        (seen,) = await mock_requests(http, stack.mock.url, via_proxy.headers["x-request-id"])
        sent = json.loads(seen["body"])
        assert sent["stream_options"] == {"include_obfuscation": False, "include_usage": True}
        assert int(dict(seen["headers"]).get("Content-Length", "0")) == len(seen["body"].encode())
    usage = await wait_requests(seed, tenant.workspace, 2)
    assert usage["input"] == 60 and usage["output"] == 24


async def test_a_compressed_chat_stream_request_is_sent_on_uncompressed_with_usage_asked(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await seed.tenant()
    await seed.grant(f"workspace:{tenant.workspace}")
    body = json.dumps(chat_body(SOL, stream=True)).encode()
    headers = {
        **KNOBS,
        "Authorization": f"Bearer {tenant.key}",
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
    }
    async with http.post(
        stack.proxy.data_url + "/v1/chat/completions", data=gzip.compress(body), headers=headers
    ) as resp:
        assert resp.status == 200
        answer = await resp.read()
        rid = resp.headers["x-request-id"]
    assert b"usage" not in answer and answer.endswith(b"data: [DONE]\n\n")
    (seen,) = await mock_requests(http, stack.mock.url, rid)
    assert "content-encoding" not in {k.lower() for k, _ in seen["headers"]}
    assert json.loads(seen["body"]) == {
        **json.loads(body),
        "stream_options": {"include_usage": True},
    }
    usage = await wait_requests(seed, tenant.workspace, 1)
    assert usage["input"] == 30 and usage["output"] == 12


def normalized(stream: bytes) -> list[Any]:
    """The events of a chat stream without what differs between two answers (id, clock)."""
    events = []
    for event in stream.split(b"\n\n"):
        if not event.startswith(b"data: {"):
            events.append(event)
            continue
        obj = json.loads(event[6:])
        obj.pop("id")
        obj.pop("created")
        events.append(obj)
    return events


async def test_unmetered_answers_are_counted_by_reason(
    stack: Stack, seed: Seeder, raw: aiohttp.ClientSession
) -> None:
    http = raw
    tenant = await seed.tenant()
    await seed.grant(f"workspace:{tenant.workspace}")
    base = stack.proxy.data_url
    before = await metric_samples(http, stack.proxy.admin_url)

    error = await request(http, base, key=tenant.key, model=SOL, headers={"x-mock-status": "500"})
    assert error.status == 500
    odd = {"x-mock-response-headers": json.dumps({"Content-Encoding": "compress"})}
    assert (await request(http, base, key=tenant.key, model=SOL, headers=odd)).status == 200
    lying = {"x-mock-response-headers": json.dumps({"Content-Encoding": "gzip"})}
    assert (await request(http, base, key=tenant.key, model=SOL, headers=lying)).status == 200
    model = await request(http, base, f"/v1/models/{SOL}", key=tenant.key)
    assert model.status == 200  # an answer without usage
    legacy = {"model": SOL, "prompt": "hi", "stream": True}  # the mock has no such route
    assert (
        await request(http, base, "/v1/completions", key=tenant.key, json_body=legacy)
    ).status == 404

    # A client that leaves mid-stream: the answer is incomplete.
    slow = {"x-mock-chunks": "50", "x-mock-chunk-delay-ms": "100"}
    body = json.dumps(chat_body(SOL, stream=True)).encode()
    async with http.post(
        base + "/v1/chat/completions",
        data=body,
        headers={
            "Authorization": f"Bearer {tenant.key}",
            "Content-Type": "application/json",
            **slow,
        },
    ) as resp:
        assert resp.status == 200
        await resp.content.readany()
        resp.close()

    expected = {"upstream_error": 2, "encoding": 2, "no_usage": 1, "incomplete": 1}
    seen: dict[str, float] = {}

    async def counted() -> bool:
        after = await metric_samples(http, stack.proxy.admin_url)
        seen.update({r: unmetered(after, r) - unmetered(before, r) for r in expected})
        return seen == expected

    try:
        await wait_until(counted, timeout=15)
    except AssertionError:
        raise AssertionError(f"unmetered answers by reason: {seen}, want {expected}") from None


# ---------------------------------------------------------------------------- the openai SDK


@pytest.fixture
def tenant(stack: Stack) -> Tenant:
    """A tenant of each test's own: usage another test metered can still be landing in Redis
    (written in batches), and must not count in this test's totals."""

    async def seed() -> Tenant:
        seeder = Seeder(stack.redis_url)
        try:
            t = await seeder.tenant()
            await seeder.grant(f"workspace:{t.workspace}")
            return t
        finally:
            await seeder.close()

    return asyncio.run(seed())


@pytest.fixture
def clients(stack: Stack, tenant: Tenant) -> Iterator[tuple[openai.OpenAI, openai.OpenAI]]:
    via = openai.OpenAI(
        base_url=stack.proxy.data_url + "/v1", api_key=tenant.key, max_retries=0, timeout=20
    )
    direct = openai.OpenAI(base_url=stack.mock.url + "/v1", api_key="x", max_retries=0, timeout=20)
    with via, direct:
        yield via, direct


def sdk_stream(client: openai.OpenAI, **extra: Any) -> list[dict[str, Any]]:
    chunks = []
    stream = client.chat.completions.create(
        model=SOL, messages=[{"role": "user", "content": "count to three"}], stream=True, **extra
    )
    for chunk in stream:
        seen = chunk.model_dump(exclude_unset=True)
        seen.pop("id")
        seen.pop("created")
        chunks.append(seen)
    return chunks


@pytest.mark.parametrize("include_usage", [None, False, True])
def test_the_sdk_streams_exactly_what_it_would_without_the_proxy(
    clients: tuple[openai.OpenAI, openai.OpenAI], include_usage: bool | None
) -> None:
    via, direct = clients
    extra: dict[str, Any] = {}
    if include_usage is not None:
        extra["stream_options"] = {"include_usage": include_usage}
    got, want = sdk_stream(via, **extra), sdk_stream(direct, **extra)
    assert got == want
    has_usage = [c for c in got if "usage" in c]
    if include_usage:
        assert got[-1]["choices"] == [] and got[-1]["usage"]["completion_tokens"] > 0
    else:
        assert has_usage == [] and all(c["choices"] for c in got)


def test_embeddings_and_sdk_streams_are_metered(
    stack: Stack, clients: tuple[openai.OpenAI, openai.OpenAI], tenant: Tenant
) -> None:
    via, _ = clients

    async def requests_now() -> int:
        seeder = Seeder(stack.redis_url)
        try:
            return (await usage_of(seeder, tenant.workspace)).get("requests", 0)
        finally:
            await seeder.close()

    before = asyncio.run(requests_now())
    embedded = via.embeddings.create(model=SOL, input=["one two three", "four"])
    assert len(embedded.data) == 2 and embedded.usage.prompt_tokens == 4
    sdk_stream(via)
    with via.responses.stream(model=SOL, input="hello there") as events:
        for _ in events:
            pass

    async def landed() -> None:
        await wait_until(
            lambda: requests_now_is(before + 3), timeout=15, message="3 more metered answers"
        )

    async def requests_now_is(n: int) -> bool:
        return await requests_now() == n

    asyncio.run(landed())
