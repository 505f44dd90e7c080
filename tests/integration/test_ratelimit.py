"""Rate limits against real Redis: GCRA exactness, replicas (in one process and in two OS
processes) sharing one limit, concurrency slots and their leases, the local fallback while Redis
is stopped, shadow limits, and the response headers."""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from proxy.config import RateLimit
from proxy.redis_server import RedisServer
from proxy.store.connection import Breaker, Gate, make_client
from proxy.store.ratelimit import (
    REPLICAS_KEY,
    LimitResult,
    RateLimiter,
    concurrency_key,
    rate_key,
)
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]

MakeLimiter = Callable[..., Awaitable[RateLimiter]]


def limit(rpm: int, burst: int, concurrent: int = 1000, shadow: bool = False) -> RateLimit:
    return RateLimit(
        requests_per_minute=rpm,
        burst=burst,
        concurrent=concurrent,
        shadow=shadow,
        tokens_per_minute=None,
    )


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def local_mode_count() -> float:
    return sample("access_proxy_failure_mode_total", check="rate_limit", mode="local")


def shadow_count() -> float:
    return sample("access_proxy_shadow_decisions_total", rule="rate_limit")


async def redis_time(client: aioredis.Redis) -> float:
    seconds, micros = await client.time()
    return float(seconds) + micros / 1e6


@pytest.fixture
async def make_limiter() -> AsyncIterator[MakeLimiter]:
    """Builds limiters, each with a client of its own (a replica); stops and closes them all."""
    made: list[tuple[RateLimiter, aioredis.Redis]] = []

    async def make(
        url: str,
        replica_id: str,
        *,
        timeout_s: float = 2.0,
        breaker: Breaker | None = None,
        **kwargs: Any,
    ) -> RateLimiter:
        client = make_client(url, timeout_s=None)
        gate = Gate(timeout_s, breaker or Breaker(failures=3, reset_s=0.05))
        limiter = RateLimiter(client, gate, replica_id, **kwargs)
        made.append((limiter, client))
        return limiter

    yield make
    for limiter, client in made:
        await limiter.stop()
        await client.aclose()


def test_headers_of_allowed_and_refused_results() -> None:
    allowed = LimitResult(True, True, 600, 59, 1.5, 0.0, None, "r:1", "redis")
    assert allowed.headers() == {
        "x-ratelimit-limit-requests": "600",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1.5s",
    }
    refused = LimitResult(False, False, 60, 0, 10.0, 0.2, "rate", None, "redis")
    assert refused.headers() == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "10s",
        "retry-after": "1",
    }
    slow = LimitResult(False, False, 6, 0, 49.9994, 9.0001, "rate", None, "local")
    assert slow.headers()["retry-after"] == "10"
    assert slow.headers()["x-ratelimit-reset-requests"] == "49.999s"
    full = LimitResult(True, True, 6, 5, 0.0, 0.0, None, None, "redis")
    assert full.headers()["x-ratelimit-reset-requests"] == "0s"


async def test_burst_is_admitted_at_once_then_refused_with_retry_after(
    redis_url: str, make_limiter: MakeLimiter
) -> None:
    limiter = await make_limiter(redis_url, "r1")
    rule = limit(rpm=6, burst=5)  # one request per 10 s
    results = [await limiter.acquire("ws-burst", "p", rule) for _ in range(6)]

    assert [r.allowed for r in results] == [True] * 5 + [False]
    assert [r.remaining for r in results[:5]] == [4, 3, 2, 1, 0]
    assert all(r.mode == "redis" and r.limit == 6 for r in results)
    assert all(r.slot is not None for r in results[:5])
    refused = results[5]
    assert refused.reason == "rate" and refused.slot is None and not refused.would_allow
    assert 9.0 < refused.retry_after_s <= 10.0
    assert 49.0 < refused.reset_s <= 50.0
    assert refused.headers()["retry-after"] == "10"
    assert 49.0 < results[4].reset_s <= 50.0
    assert results[4].retry_after_s == 0.0 and "retry-after" not in results[4].headers()

    other_program = await limiter.acquire("ws-burst", None, rule)
    assert other_program.allowed and other_program.remaining == 4


async def test_steady_rate_after_the_burst(redis_url: str, make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter(redis_url, "r1")
    client = make_client(redis_url, timeout_s=None)
    rule = limit(rpm=600, burst=2)  # one request per 100 ms
    try:
        start = await redis_time(client)
        admitted = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            result = await limiter.acquire("ws-steady", "p", rule)
            if result.allowed:
                admitted += 1
                await limiter.release(result)
            else:
                assert 0.0 < result.retry_after_s <= 0.1
            await asyncio.sleep(0.005)
        elapsed = await redis_time(client) - start
    finally:
        await client.aclose()
    assert admitted <= 2 + math.floor(elapsed / 0.1)
    assert admitted >= elapsed / 0.1 / 2


async def test_no_window_admits_more_than_burst_plus_rate(
    redis_url: str, make_limiter: MakeLimiter
) -> None:
    """For every pair of admissions i <= j: (j - i + 1) <= burst + rate x (time between them).

    A fixed-window counter breaks this at its window edges; GCRA holds it everywhere.
    """
    limiter = await make_limiter(redis_url, "r1")
    rule = limit(rpm=120, burst=3)  # one request per 500 ms
    spans: list[tuple[float, float]] = []
    deadline = time.monotonic() + 1.6
    while time.monotonic() < deadline:
        before = time.monotonic()
        result = await limiter.acquire("ws-window", "p", rule)
        after = time.monotonic()
        if result.allowed:
            spans.append((before, after))
            await limiter.release(result)
        await asyncio.sleep(0.005)

    assert len(spans) >= 4
    for i in range(len(spans)):
        for j in range(i, len(spans)):
            window = spans[j][1] - spans[i][0]
            assert j - i + 1 <= 3 + window / 0.5, (i, j, window)


async def test_two_replicas_hammering_one_key_admit_at_most_burst_plus_rate(
    redis_url: str, make_limiter: MakeLimiter
) -> None:
    # A generous deadline: 200 calls opening connections at once on a loaded machine.
    first = await make_limiter(redis_url, "replica-a", timeout_s=15.0)
    second = await make_limiter(redis_url, "replica-b", timeout_s=15.0)
    client = make_client(redis_url, timeout_s=None)
    rule = limit(rpm=60, burst=10)
    # Open each replica's connections first, so the measured span is the contest alone.
    warm = limit(rpm=60_000, burst=1000)
    await asyncio.gather(
        *(replica.acquire("ws-warm", None, warm) for replica in (first, second) for _ in range(100))
    )
    try:
        start = await redis_time(client)
        results = await asyncio.gather(
            *(first.acquire("ws-shared", "p", rule) for _ in range(100)),
            *(second.acquire("ws-shared", "p", rule) for _ in range(100)),
        )
        elapsed = await redis_time(client) - start
    finally:
        await client.aclose()
    assert all(r.mode == "redis" for r in results)
    admitted = sum(r.allowed for r in results)
    assert 10 <= admitted <= 10 + math.floor(elapsed * 1.0)
    await asyncio.gather(*(first.release(r) for r in results[:100]))
    await asyncio.gather(*(second.release(r) for r in results[100:]))


WORKER = """
import asyncio, json, sys, time
from proxy.config import RateLimit
from proxy.store.connection import Breaker, Gate, make_client
from proxy.store.ratelimit import RateLimiter

async def main(url, replica):
    client = make_client(url, timeout_s=None)
    limiter = RateLimiter(client, Gate(2.0, Breaker(3, 0.05)), replica)
    rule = RateLimit(
        requests_per_minute=60, burst=10, concurrent=1000, shadow=False, tokens_per_minute=None
    )
    await client.ping()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    counts = {"admitted": 0, "attempts": 0, "local": 0}
    deadline = time.monotonic() + 1.0

    async def hammer():
        while time.monotonic() < deadline:
            result = await limiter.acquire("ws-processes", "p", rule)
            counts["attempts"] += 1
            counts["local"] += result.mode == "local"
            if result.allowed:
                counts["admitted"] += 1
                await limiter.release(result)

    await asyncio.gather(*(hammer() for _ in range(4)))
    print(json.dumps(counts), flush=True)
    await client.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_two_proxy_processes_share_one_limit(redis_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WORKER,
            redis_url,
            f"process-{n}",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env=env,
        )
        for n in range(2)
    ]
    client = make_client(redis_url, timeout_s=None)
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=20)
            assert line.strip() == b"ready"
        start = await redis_time(client)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        outputs = [await asyncio.wait_for(proc.communicate(), timeout=20) for proc in procs]
        elapsed = await redis_time(client) - start
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await client.aclose()

    assert all(proc.returncode == 0 for proc in procs)
    counts = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert all(c["local"] == 0 for c in counts)
    assert all(c["attempts"] > 20 for c in counts)
    admitted = sum(c["admitted"] for c in counts)
    # 60 rpm with a burst of 10: the burst, plus one a second.
    assert 10 <= admitted <= 10 + math.floor(elapsed * 1.0)


async def test_concurrency_cap_refuses_without_spending_the_rate_and_release_frees(
    redis_url: str, make_limiter: MakeLimiter
) -> None:
    limiter = await make_limiter(redis_url, "r1")
    rule = limit(rpm=6, burst=5, concurrent=3)
    held = [await limiter.acquire("ws-cc", "p", rule) for _ in range(3)]
    assert all(r.allowed for r in held) and held[-1].remaining == 2

    refused = await limiter.acquire("ws-cc", "p", rule)
    assert not refused.allowed and refused.reason == "concurrency" and refused.slot is None
    assert refused.remaining == 2  # the refusal spent nothing of the rate
    assert refused.headers()["retry-after"] == "1"

    await limiter.release(held[0])
    again = await limiter.acquire("ws-cc", "p", rule)
    assert again.allowed and again.remaining == 1

    await limiter.release(held[0])  # a second release must not free someone else's slot
    still_full = await limiter.acquire("ws-cc", "p", rule)
    assert not still_full.allowed and still_full.reason == "concurrency"


async def test_slots_of_a_crashed_replica_expire(redis_url: str, make_limiter: MakeLimiter) -> None:
    rule = limit(rpm=6000, burst=100, concurrent=2)
    crashed = await make_limiter(redis_url, "crashed", lease_s=0.5)
    assert all([(await crashed.acquire("ws-crash", None, rule)).allowed for _ in range(2)])
    # The crashed replica never releases and never refreshes its leases.

    survivor = await make_limiter(redis_url, "survivor")
    first = await survivor.acquire("ws-crash", None, rule)
    assert not first.allowed and first.reason == "concurrency"

    async def admitted() -> bool:
        return (await survivor.acquire("ws-crash", None, rule)).allowed

    await wait_until(admitted, timeout=5.0, message="the crashed replica's slots expired")


async def test_held_slots_keep_their_lease_while_the_replica_lives(
    redis_url: str, redis_client: aioredis.Redis, make_limiter: MakeLimiter
) -> None:
    rule = limit(rpm=6000, burst=100, concurrent=1)
    holder = await make_limiter(redis_url, "holder", lease_s=0.6, heartbeat_s=0.1)
    await holder.start()
    held = await holder.acquire("ws-lease", "p", rule)
    slot = held.slot
    assert held.allowed and slot is not None
    key = concurrency_key("ws-lease", "p")
    first_expiry = await redis_client.zscore(key, slot)
    assert first_expiry is not None

    async def extended_past_first_lease() -> bool:
        score = await redis_client.zscore(key, slot)
        return score is not None and score > first_expiry + 1.0e6

    await wait_until(extended_past_first_lease, timeout=5.0)
    other = await make_limiter(redis_url, "other")
    blocked = await other.acquire("ws-lease", "p", rule)
    assert not blocked.allowed and blocked.reason == "concurrency"

    await holder.release(held)
    assert await redis_client.zscore(key, slot) is None
    assert (await other.acquire("ws-lease", "p", rule)).allowed


async def test_heartbeat_tracks_live_replicas(
    private_redis: RedisServer, make_limiter: MakeLimiter
) -> None:
    # A Redis of its own: the session's is shared with the end-to-end suite's long-running
    # `serve`, whose heartbeat counts it as a replica too.
    url = private_redis.url
    first = await make_limiter(url, "hb-a", heartbeat_s=0.1)
    second = await make_limiter(url, "hb-b", heartbeat_s=0.1)
    await first.start()
    await second.start()
    await wait_until(lambda: first.replicas == 2 and second.replicas == 2)
    client = aioredis.Redis.from_url(url)
    try:
        assert sorted(await client.zrange(REPLICAS_KEY, 0, -1)) == [b"hb-a", b"hb-b"]
    finally:
        await client.aclose()
    await second.stop()
    await wait_until(lambda: first.replicas == 1)


async def test_local_share_while_redis_is_stopped_then_recovery(
    private_redis: RedisServer, make_limiter: MakeLimiter
) -> None:
    url = private_redis.url
    breaker = Breaker(failures=1, reset_s=0.1)
    limiter = await make_limiter(url, "local-a", timeout_s=0.5, breaker=breaker, heartbeat_s=0.1)
    peer = await make_limiter(url, "local-b", heartbeat_s=0.1)
    await limiter.start()
    await peer.start()
    await wait_until(lambda: limiter.replicas == 2)

    await private_redis.stop()
    rule = limit(rpm=60, burst=10, concurrent=4)  # the share of 2 replicas: 30 rpm, 5, 2
    before = local_mode_count()

    first = await limiter.acquire("ws-local", "p", rule)
    second = await limiter.acquire("ws-local", "p", rule)
    assert first.mode == second.mode == "local"
    assert first.allowed and second.allowed and first.limit == 30
    assert [first.remaining, second.remaining] == [4, 3]
    capped = await limiter.acquire("ws-local", "p", rule)
    assert not capped.allowed and capped.reason == "concurrency" and capped.remaining == 3

    await limiter.release(first)
    await limiter.release(second)
    for expected in (2, 1, 0):
        result = await limiter.acquire("ws-local", "p", rule)
        assert result.allowed and result.remaining == expected
        await limiter.release(result)
    refused = await limiter.acquire("ws-local", "p", rule)
    assert not refused.allowed and refused.reason == "rate" and refused.mode == "local"
    assert 1.9 < refused.retry_after_s <= 2.0  # one request per 2 s for this replica's share
    assert local_mode_count() - before == 7
    assert limiter.replicas == 2  # the last count seen stays while Redis is away

    await private_redis.start()

    async def back_on_redis() -> bool:
        return (await limiter.acquire("ws-recovered", "p", rule)).mode == "redis"

    await wait_until(back_on_redis, timeout=10.0, message="limits judged in Redis again")
    shared = await peer.acquire("ws-recovered", "p", rule)
    assert shared.mode == "redis" and shared.limit == 60


async def test_shadow_limit_is_counted_but_not_enforced(
    redis_url: str, make_limiter: MakeLimiter
) -> None:
    limiter = await make_limiter(redis_url, "r1")
    rule = limit(rpm=6, burst=2, concurrent=1000, shadow=True)
    before = shadow_count()
    results = [await limiter.acquire("ws-shadow", "p", rule) for _ in range(4)]
    assert all(r.allowed for r in results)
    assert [r.would_allow for r in results] == [True, True, False, False]
    assert results[2].reason == "rate" and results[2].retry_after_s == 0.0
    assert results[2].slot is None and "retry-after" not in results[2].headers()
    # Shadow refusals spend nothing, as an enforced refusal would not.
    assert results[3].remaining == 0 and 19.0 < results[3].reset_s <= 20.0
    assert shadow_count() - before == 2

    enforced = await limiter.acquire("ws-shadow", "p", limit(rpm=6, burst=2))
    assert not enforced.allowed and shadow_count() - before == 2


async def test_concurrency_shadow_counts_without_taking_a_slot(
    redis_url: str, make_limiter: MakeLimiter
) -> None:
    limiter = await make_limiter(redis_url, "r1")
    rule = limit(rpm=6000, burst=100, concurrent=1, shadow=True)
    before = shadow_count()
    held = await limiter.acquire("ws-shadow-cc", "p", rule)
    over = await limiter.acquire("ws-shadow-cc", "p", rule)
    assert held.would_allow and over.allowed and not over.would_allow
    assert over.reason == "concurrency" and over.slot is None
    assert shadow_count() - before == 1


async def test_script_reloads_after_redis_forgets_it(
    redis_url: str, redis_client: aioredis.Redis, make_limiter: MakeLimiter
) -> None:
    limiter = await make_limiter(redis_url, "r1")
    rule = limit(rpm=1, burst=3)  # no refill between the two calls, however slow the machine
    assert (await limiter.acquire("ws-noscript", "p", rule)).mode == "redis"
    await redis_client.script_flush()
    result = await limiter.acquire("ws-noscript", "p", rule)
    assert result.mode == "redis" and result.remaining == 1
    assert await redis_client.exists(rate_key("ws-noscript", "p")) == 1
