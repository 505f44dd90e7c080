"""Rate limits and admin changes across two real ``serve`` processes sharing one Redis: the
limiter's accuracy under concurrent load, its headers (also on streams, before the first byte),
concurrency slots freed by a client that goes away, health endpoints, and a key revoked through
one process's admin API refused by the other."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator

import aiohttp
import pytest

from tests.conftest import wait_until
from tests.e2e.conftest import (
    Seeder,
    ServeProcess,
    Stack,
    assert_error,
    chat_body,
    request,
)

OPS_TOKEN = "limits-ops-token-0123456789"
RPM, BURST = 60, 5
LIMITS = {
    "admin": {
        "tokens": [
            {
                "name": "ops",
                "sha256": hashlib.sha256(OPS_TOKEN.encode()).hexdigest(),
                "roles": ["operator"],
            }
        ]
    },
    "rate_limits": {
        "enabled": True,
        # Models in no program: a generous rate, one request at a time.
        "default": {"requests_per_minute": 6000, "burst": 100, "concurrent": 1},
        "programs": {
            "gpt-5.6-preview": {"requests_per_minute": RPM, "burst": BURST, "concurrent": 100}
        },
    },
}
LIMIT_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
)


@pytest.fixture(scope="module")
def pair(stack: Stack) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    a = stack.start_serve("limits-a", overrides=LIMITS)
    try:
        b = stack.start_serve("limits-b", overrides=LIMITS)
        try:
            yield a, b
        finally:
            assert b.stop() == 0
    finally:
        assert a.stop() == 0


async def test_two_processes_together_admit_at_most_burst_plus_rate(
    pair: tuple[ServeProcess, ServeProcess], seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await seed.tenant()
    await seed.grant(f"workspace:{tenant.workspace}")
    urls = [p.data_url for p in pair]

    started = time.monotonic()
    answers = await asyncio.gather(
        *(request(http, urls[i % 2], key=tenant.key, model="gpt-5.6-sol") for i in range(40))
    )
    elapsed = time.monotonic() - started
    admitted = [a for a in answers if a.status == 200]
    refused = [a for a in answers if a.status != 200]
    # GCRA: the burst at once, then one request per second of the window; never more.
    assert BURST <= len(admitted) <= BURST + int(elapsed * RPM / 60) + 1, (len(admitted), elapsed)
    for answer in refused:
        assert_error(answer, "rate_limit_exceeded")
        assert int(answer.headers["retry-after"]) >= 1
    for answer in answers:
        for name in LIMIT_HEADERS:
            assert name in answer.headers, (answer.status, name)
        assert answer.headers["x-ratelimit-limit-requests"] == str(RPM)


async def test_stream_carries_limit_headers_and_its_slot_frees_when_the_client_goes(
    pair: tuple[ServeProcess, ServeProcess], seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await seed.tenant()
    a, b = pair
    headers = {
        "Authorization": f"Bearer {tenant.key}",
        "x-mock-chunks": "20",
        "x-mock-chunk-delay-ms": "200",
    }
    body = chat_body("gpt-4o-mini", stream=True)
    async with aiohttp.ClientSession() as streaming:
        resp = await streaming.post(a.data_url + "/v1/chat/completions", json=body, headers=headers)
        assert resp.status == 200
        # The headers arrived before the first event was read.
        for name in LIMIT_HEADERS:
            assert name in resp.headers, name
        assert await resp.content.readline()
        # The one concurrency slot is held, on every replica.
        busy = await request(http, b.data_url, key=tenant.key, model="gpt-4o-mini")
        assert_error(busy, "rate_limit_exceeded")
        resp.close()  # the client goes away mid-stream

    async def slot_free() -> bool:
        answer = await request(http, b.data_url, key=tenant.key, model="gpt-4o-mini")
        return answer.status == 200

    await wait_until(slot_free, timeout=5.0, message="slot released after the disconnect")


async def test_health_on_the_admin_listener_and_no_admin_path_on_the_data_listener(
    pair: tuple[ServeProcess, ServeProcess], http: aiohttp.ClientSession
) -> None:
    a, _ = pair
    async with http.get(a.admin_url + "/healthz") as resp:
        assert resp.status == 200
    async with http.get(a.admin_url + "/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ready"
    for path in ("/admin/v1/orgs", "/healthz", "/metrics"):
        answer = await request(
            http, a.data_url, path, headers={"Authorization": f"Bearer {OPS_TOKEN}"}
        )
        assert_error(answer, "unknown_route")


async def test_a_key_revoked_through_one_admin_api_is_refused_by_the_other_process(
    pair: tuple[ServeProcess, ServeProcess], seed: Seeder, http: aiohttp.ClientSession
) -> None:
    a, b = pair
    tenant = await seed.tenant()
    answer = await request(http, b.data_url, key=tenant.key, model="gpt-4o-mini")
    assert answer.status == 200  # b has the key cached now
    async with http.delete(
        f"{a.admin_url}/admin/v1/keys/{tenant.key_id}",
        headers={"Authorization": f"Bearer {OPS_TOKEN}"},
    ) as resp:
        assert resp.status == 204
    revoked_at = time.monotonic()

    async def refused() -> bool:
        answer = await request(http, b.data_url, key=tenant.key, model="gpt-4o-mini")
        return answer.status == 401

    await wait_until(refused, timeout=5.0, message="revocation reached the other process")
    print(f"revoked key refused by the other process after {time.monotonic() - revoked_at:.4f}s")
