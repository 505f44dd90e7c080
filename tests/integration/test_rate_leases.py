"""Rate limit leases on real Redis (``lease_requests`` > 0): requests admitted from a lease make
no Redis call (counted by the server itself), replicas in two OS processes stay within
``burst + rate × t + replicas × lease``, unused requests and idle slots go back when the lease
lifetime is over, a changed limit drops the lease at once, token budgets still refuse, and the
local share still answers while Redis is stopped."""

from __future__ import annotations

import asyncio
import dataclasses
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import RateLimit
from proxy.redis_server import RedisServer
from proxy.store.connection import Breaker, Gate, make_client
from proxy.store.ratelimit import RateLimiter
from proxy.store.schema import concurrency_key
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]

MakeLimiter = Callable[..., Awaitable[RateLimiter]]


def limit(rpm: int, burst: int, concurrent: int = 1000, tpm: int | None = None) -> RateLimit:
    return RateLimit(
        requests_per_minute=rpm,
        burst=burst,
        concurrent=concurrent,
        shadow=False,
        tokens_per_minute=tpm,
    )


async def script_calls(client: aioredis.Redis) -> int:
    """EVAL and EVALSHA calls the server has run, from its own command statistics."""
    stats = await client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


async def redis_time(client: aioredis.Redis) -> float:
    seconds, micros = await client.time()
    return float(seconds) + micros / 1e6


@pytest.fixture
async def make_limiter() -> AsyncIterator[MakeLimiter]:
    made: list[tuple[RateLimiter, aioredis.Redis]] = []

    async def make(url: str, replica_id: str, *, start: bool = False, **kw: Any) -> RateLimiter:
        client = make_client(url, timeout_s=None)
        kw.setdefault("heartbeat_s", 60.0)
        limiter = RateLimiter(client, Gate(5.0, Breaker(1, 0.1)), replica_id, **kw)
        made.append((limiter, client))
        if start:
            await limiter.start()
        return limiter

    yield make
    for limiter, client in made:
        await limiter.stop()
        await client.aclose()


async def test_a_workspace_with_lease_left_makes_no_redis_call(
    redis_url: str, make_limiter: MakeLimiter
) -> None:
    client = make_client(redis_url, timeout_s=None)
    leased = await make_limiter(redis_url, "lease-a", lease_requests=10, lease_lifetime_s=1.0)
    direct = await make_limiter(redis_url, "lease-b")
    rule = limit(rpm=60, burst=20)
    try:
        await direct.acquire("ws-warm", None, rule)  # the server caches the script
        before = await script_calls(client)
        first = await leased.acquire("ws-count", "p", rule)
        assert first.allowed and await script_calls(client) == before + 1
        # Nine more are in the lease; the next three leave more than half: no call at all.
        seen = [first]
        for _ in range(3):
            result = await leased.acquire("ws-count", "p", rule)
            assert result.allowed and result.mode == "redis"
            await leased.release(result)
            seen.append(result)
        assert await script_calls(client) == before + 1
        # Remaining is the shared bucket minus what this replica used: one less each time.
        assert [r.remaining for r in seen] == [19, 18, 17, 16]
        # Half spent: the next lease is fetched in the background, in one call.
        await leased.acquire("ws-count", "p", rule)
        await wait_until(
            lambda: _calls_reach(client, before + 2), timeout=10, message="no fetch ahead"
        )
        # Without leases every request is a call: the count above can tell.
        mark = await script_calls(client)
        for _ in range(3):
            await direct.acquire("ws-count-direct", "p", rule)
        assert await script_calls(client) == mark + 3
    finally:
        await client.aclose()


async def _calls_reach(client: aioredis.Redis, n: int) -> bool:
    return await script_calls(client) >= n


WORKER = """
import asyncio, json, sys, time
from proxy.config import RateLimit
from proxy.store.connection import Breaker, Gate, make_client
from proxy.store.ratelimit import RateLimiter

async def main(url, replica, lease):
    client = make_client(url, timeout_s=None)
    limiter = RateLimiter(
        client, Gate(5.0, Breaker(3, 0.05)), replica, lease_requests=lease, lease_lifetime_s=0.5
    )
    rule = RateLimit(
        requests_per_minute=60, burst=10, concurrent=1000, shadow=False, tokens_per_minute=None
    )
    await limiter.start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    counts = {"admitted": 0, "attempts": 0, "local": 0}
    deadline = time.monotonic() + 1.5

    async def hammer():
        while time.monotonic() < deadline:
            result = await limiter.acquire("ws-lease-processes", "p", rule)
            counts["attempts"] += 1
            counts["local"] += result.mode == "local"
            if result.allowed:
                counts["admitted"] += 1
                await limiter.release(result)
            else:
                await asyncio.sleep(0)

    await asyncio.gather(*(hammer() for _ in range(4)))
    print(json.dumps(counts), flush=True)
    await limiter.stop()
    await client.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_two_processes_with_leases_stay_within_the_bound(redis_url: str) -> None:
    lease = 4
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WORKER,
            redis_url,
            f"lease-process-{n}",
            str(lease),
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
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
            assert line.strip() == b"ready"
        start = await redis_time(client)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        outputs = [await asyncio.wait_for(proc.communicate(), timeout=30) for proc in procs]
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
    # 60 rpm, burst 10, two replicas holding at most `lease` unspent requests each.
    assert 10 - 2 * lease <= admitted <= 10 + math.floor(elapsed * 1.0) + 2 * lease


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    burst=st.integers(1, 30),
    lease=st.integers(1, 12),
    replicas=st.integers(1, 3),
    requests=st.integers(1, 60),
)
async def test_replicas_in_one_process_never_pass_the_bound(
    redis_server: RedisServer, burst: int, lease: int, replicas: int, requests: int
) -> None:
    url = redis_server.url
    client = make_client(url, timeout_s=None)
    await client.flushall()
    limiters = [
        RateLimiter(
            make_client(url, timeout_s=None),
            Gate(5.0, Breaker(3, 0.05)),
            f"prop-{n}",
            lease_requests=lease,
            lease_lifetime_s=0.1,
        )
        for n in range(replicas)
    ]
    for lim in limiters:
        await lim.start()
    rule = limit(rpm=1, burst=burst)  # one a minute: nothing refills while the test runs
    try:
        results = await asyncio.gather(
            *(lim.acquire("ws-prop", None, rule) for lim in limiters for _ in range(requests))
        )
        assert all(r.mode == "redis" for r in results)
        admitted = sum(r.allowed for r in results)
        # Leases are carved out of the bucket: never more than it holds.
        assert admitted <= burst
        # Unused requests go back once the leases expire: then exactly the burst, never more.
        late, turn, deadline = 0, 0, time.monotonic() + 20
        while admitted + late < burst and time.monotonic() < deadline:
            turn += 1
            late += (await limiters[turn % replicas].acquire("ws-prop", None, rule)).allowed
            await asyncio.sleep(0.01)  # pacing only: the deadline decides
        assert admitted + late == burst
        await asyncio.sleep(0.3)  # past any lease lifetime: what is leased now must not add up
        extra = [await lim.acquire("ws-prop", None, rule) for lim in limiters]
        assert admitted + late + sum(r.allowed for r in extra) <= burst
    finally:
        for lim in limiters:
            await lim.stop()
            await lim._redis.aclose()
        await client.aclose()


async def test_unused_requests_go_back_when_the_lease_expires(
    redis_url: str, make_limiter: MakeLimiter
) -> None:
    holder = await make_limiter(
        redis_url, "lease-holder", start=True, lease_requests=8, lease_lifetime_s=0.2
    )
    other = await make_limiter(redis_url, "lease-other")  # a call per request
    rule = limit(rpm=1, burst=10)  # nothing refills while the test runs
    assert (await holder.acquire("ws-back", None, rule)).allowed  # leases 8, uses 1
    taken = [(await other.acquire("ws-back", None, rule)).allowed for _ in range(4)]
    assert taken == [True, True, False, False]  # the 7 unused are held by the lease
    # Once the lease's lifetime is over, its 7 unused requests are back in the shared bucket.
    await wait_until(
        lambda: _allowed(other, "ws-back", rule), timeout=10, message="the lease was hoarded"
    )
    more = [(await other.acquire("ws-back", None, rule)).allowed for _ in range(8)]
    assert more == [True] * 6 + [False, False]  # 1 + 2 + 1 + 6 = the burst, never more


async def _allowed(limiter: RateLimiter, ws: str, rule: RateLimit) -> bool:
    return (await limiter.acquire(ws, None, rule)).allowed


async def test_idle_pooled_slots_are_released_after_a_lifetime(
    redis_url: str, make_limiter: MakeLimiter
) -> None:
    holder = await make_limiter(
        redis_url, "pool-holder", start=True, lease_requests=8, lease_lifetime_s=0.2
    )
    other = await make_limiter(redis_url, "pool-other")
    client = make_client(redis_url, timeout_s=None)
    rule = limit(rpm=6000, burst=100, concurrent=2)
    try:
        held = await holder.acquire("ws-pool", None, rule)
        assert held.allowed
        # The cap holds across replicas: the holder's pool has both slots.
        assert await client.zcard(concurrency_key("ws-pool", None)) == 2
        refused = await other.acquire("ws-pool", None, rule)
        assert not refused.allowed and refused.reason == "concurrency"
        # A request ending returns its slot to the pool without a call; idle, it goes back.
        await holder.release(held)
        await holder.release(held)  # twice: harmless
        await wait_until(
            lambda: _allowed(other, "ws-pool", rule), timeout=10, message="slots hoarded"
        )
    finally:
        await client.aclose()


async def test_concurrency_cap_holds_with_a_pool(redis_url: str, make_limiter: MakeLimiter) -> None:
    limiter = await make_limiter(redis_url, "pool-cap", lease_requests=8)
    rule = limit(rpm=6000, burst=100, concurrent=3)
    results = [await limiter.acquire("ws-cap", None, rule) for _ in range(5)]
    assert [r.allowed for r in results] == [True, True, True, False, False]
    assert results[3].reason == "concurrency"
    await limiter.release(results[0])
    again = await limiter.acquire("ws-cap", None, rule)
    assert again.allowed
    # A double release of a result must not free the slot another request now holds.
    await limiter.release(results[0])
    assert not (await limiter.acquire("ws-cap", None, rule)).allowed


async def test_a_changed_limit_drops_the_lease_at_once(
    redis_url: str, make_limiter: MakeLimiter
) -> None:
    limiter = await make_limiter(redis_url, "lease-tier", lease_requests=8)
    normal = limit(rpm=60, burst=20)
    restricted = dataclasses.replace(normal, requests_per_minute=12, burst=4)  # factor 0.2
    assert (await limiter.acquire("ws-tier", None, normal)).allowed
    # The tier changed: the next request is judged under the new limit, not the old lease.
    after = await limiter.acquire("ws-tier", None, restricted)
    assert after.limit == 12
    admitted = 1 + sum(
        [(await limiter.acquire("ws-tier", None, restricted)).allowed for _ in range(10)]
    )
    # The restricted bucket is shared with what the normal lease took (20 s of TAT at 1/s), so
    # at most its burst is let through, never the old lease's 7 left.
    assert admitted <= 4


async def test_token_budget_still_refuses_with_leases(
    redis_url: str, make_limiter: MakeLimiter
) -> None:
    limiter = await make_limiter(redis_url, "lease-tokens", lease_requests=8)
    rule = limit(rpm=60_000, burst=1000, tpm=100)
    first = await limiter.acquire("ws-tok", "p", rule)
    assert first.allowed and first.tokens is not None and first.tokens.remaining == 100
    limiter.consume("ws-tok", "p", 100, 100)
    # The lease has requests left, but the budget seen minus what was metered here is spent.
    refused = await limiter.acquire("ws-tok", "p", rule)
    assert not refused.allowed and refused.reason == "tokens"
    assert refused.headers()["x-ratelimit-remaining-tokens"] == "0"


async def test_local_share_while_redis_is_stopped(private_redis: RedisServer) -> None:
    client = make_client(private_redis.url, timeout_s=None)
    limiter = RateLimiter(client, Gate(0.5, Breaker(1, 60.0)), "lease-down", lease_requests=8)
    rule = limit(rpm=60, burst=4)
    try:
        await private_redis.stop()
        results = [await limiter.acquire("ws-down", None, rule) for _ in range(6)]
        assert all(r.mode == "local" for r in results)
        assert [r.allowed for r in results] == [True] * 4 + [False, False]
    finally:
        await limiter.stop()
        await client.aclose()


async def test_a_burst_of_waiting_requests_is_leased_in_a_few_calls(
    redis_url: str, make_limiter: MakeLimiter
) -> None:
    """Hundreds of requests arriving at once (a burst of new streams) for one workspace: the
    fetch after the first takes as many requests and slots as wait behind it, so they are let in
    after a few calls, not one lease of 8 at a time."""
    client = make_client(redis_url, timeout_s=None)
    try:
        limiter = await make_limiter(redis_url, "burst-a", lease_requests=8)
        rule = limit(rpm=600_000, burst=10_000, concurrent=1000)
        before = await script_calls(client)
        results = await asyncio.gather(
            *(limiter.acquire("ws-burst", "prog", rule) for _ in range(400))
        )
        calls = await script_calls(client) - before
        assert all(r.allowed for r in results)
        assert calls <= 20, calls  # 7 to 11 here; a lease of 8 at a time took 369
        assert await client.zcard(concurrency_key("ws-burst", "prog")) <= 1000
        for r in results:
            await limiter.release(r)
    finally:
        await client.aclose()
