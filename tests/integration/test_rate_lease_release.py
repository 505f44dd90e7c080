"""The leased fast path on real Redis: ``acquire_now`` admits from this replica's lease with no
wait and no Redis call, and ``free`` gives a slot back to the pool at once (nothing to await), so
a request ending needs no task; only a slot held in Redis is left to an awaited call. The
concurrency cap, the lease bound and a double release are tried against it."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.redis_server import RedisServer
from proxy.store.connection import Breaker, Gate, make_client
from proxy.store.ratelimit import LimitResult, RateLimiter
from proxy.store.schema import concurrency_key
from tests.integration.test_rate_leases import limit, script_calls


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = make_client(redis_url, timeout_s=None)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def leased(redis_url: str) -> AsyncIterator[RateLimiter]:
    limiter = RateLimiter(
        make_client(redis_url, timeout_s=None),
        Gate(5.0, Breaker(3, 0.1)),
        "release-test",
        heartbeat_s=60.0,
        lease_requests=8,
        lease_lifetime_s=30.0,  # no lease runs out while a test looks
    )
    try:
        yield limiter
    finally:
        await limiter.stop()
        await limiter._redis.aclose()


async def test_a_slot_back_to_the_pool_is_free_when_free_returns(
    leased: RateLimiter, admin: aioredis.Redis
) -> None:
    rule = limit(rpm=6000, burst=100, concurrent=2)
    first = await leased.acquire("ws-sync", None, rule)
    second = await leased.acquire("ws-sync", None, rule)
    assert first.allowed and second.allowed
    # Both slots of the cap are in use: nothing to admit from, and Redis refuses a third.
    assert leased.acquire_now("ws-sync", None, rule) is None
    third = await leased.acquire("ws-sync", None, rule)
    assert not third.allowed and third.reason == "concurrency"

    before = await script_calls(admin)
    assert leased.free(first) is None  # back to the pool: nothing left to wait for
    again = leased.acquire_now("ws-sync", None, rule)  # the very next step, no await between
    assert again is not None and again.allowed and again.mode == "redis"
    # A second free of the same result must not free the slot ``again`` now holds.
    assert leased.free(first) is None
    assert leased.acquire_now("ws-sync", None, rule) is None
    assert not (await leased.acquire("ws-sync", None, rule)).allowed
    assert await script_calls(admin) == before + 1  # only that refusal asked Redis
    assert await admin.zcard(concurrency_key("ws-sync", None)) == 2


async def test_a_slot_whose_lease_was_dropped_is_freed_in_redis(
    leased: RateLimiter, admin: aioredis.Redis
) -> None:
    normal = limit(rpm=6000, burst=100, concurrent=4)
    held = await leased.acquire("ws-drop", None, normal)
    assert held.allowed
    cc = concurrency_key("ws-drop", None)
    assert await admin.zcard(cc) == 4  # the pool took the whole cap
    # A tier change: the lease goes, its idle slots are given back at the next sweep.
    restricted = dataclasses.replace(normal, concurrent=1)
    assert leased.acquire_now("ws-drop", None, restricted) is None
    assert not (await leased.acquire("ws-drop", None, restricted)).allowed
    await leased._sweep()
    assert await admin.zcard(cc) == 1  # the slot in use is still held
    pending = leased.free(held)
    assert pending is not None and inspect.isawaitable(pending)
    await pending
    assert await admin.zcard(cc) == 0
    assert leased.free(held) is None  # twice: harmless
    assert (await leased.acquire("ws-drop", None, restricted)).allowed


async def test_without_leases_a_release_is_a_redis_call(redis_url: str) -> None:
    limiter = RateLimiter(
        make_client(redis_url, timeout_s=None), Gate(5.0, Breaker(3, 0.1)), "no-lease"
    )
    rule = limit(rpm=6000, burst=100, concurrent=1)
    try:
        assert limiter.acquire_now("ws-direct", None, rule) is None
        held = await limiter.acquire("ws-direct", None, rule)
        assert held.allowed
        assert not (await limiter.acquire("ws-direct", None, rule)).allowed
        pending = limiter.free(held)
        assert pending is not None
        await pending
        assert (await limiter.acquire("ws-direct", None, rule)).allowed
    finally:
        await limiter.stop()
        await limiter._redis.aclose()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    concurrent=st.integers(1, 5),
    lease=st.integers(1, 6),
    ops=st.lists(
        st.one_of(st.just("now"), st.just("acquire"), st.just("again"), st.integers(0, 7)),
        max_size=40,
    ),
)
@example(concurrent=1, lease=4, ops=["acquire", 0, "again", "now", "now"])
async def test_the_fast_path_keeps_the_cap_and_the_bucket(
    redis_server: RedisServer, concurrent: int, lease: int, ops: list[Any]
) -> None:
    """Requests admitted from the lease and freed at once, in any order: never more than the
    cap in flight (here and in Redis), never more than the burst in all (nothing refills at
    1 a minute), and no slot handed to two requests, even when a result is freed twice."""
    admin = make_client(redis_server.url, timeout_s=None)
    limiter = RateLimiter(
        make_client(redis_server.url, timeout_s=None),
        Gate(5.0, Breaker(3, 0.1)),
        "prop-release",
        heartbeat_s=60.0,
        lease_requests=lease,
        lease_lifetime_s=30.0,
    )
    burst = 12
    rule = limit(rpm=1, burst=burst, concurrent=concurrent)
    in_flight: list[LimitResult] = []
    freed: list[LimitResult] = []
    admitted = 0
    try:
        await admin.flushall()
        for op in ops:
            if op == "now":
                result = limiter.acquire_now("ws-prop", None, rule)
            elif op == "acquire":
                result = await limiter.acquire("ws-prop", None, rule)
            else:
                # A request ends; "again" frees one that ended before once more.
                if op == "again" and freed:
                    done = freed[-1]
                elif op != "again" and in_flight:
                    done = in_flight.pop(op % len(in_flight))
                    freed.append(done)
                else:
                    continue
                pending = limiter.free(done)
                if pending is not None:
                    await pending
                continue
            if result is not None and result.allowed:
                assert result.slot is not None
                assert all(r.slot != result.slot for r in in_flight)
                in_flight.append(result)
                admitted += 1
            assert len(in_flight) <= concurrent
            assert admitted <= burst
            members = await admin.zcard(concurrency_key("ws-prop", None))
            assert members <= concurrent
    finally:
        await limiter.stop()
        await limiter._redis.aclose()
        await admin.aclose()
