"""The entitlement cache against a real Redis (SPEC §5): hits make no round trip, concurrent
misses share one read, the ttl bounds staleness, stale_if_error keeps known facts while Redis is
away and fails closed for the rest, the circuit breaker stops calling a Redis that does not
answer, and a read that raced an invalidation is not cached."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from proxy.config import CacheConfig
from proxy.policy import Facts
from proxy.redis_server import RedisServer
from proxy.store import schema
from proxy.store.cache import MISSING, EntitlementUnavailable, FactCache
from proxy.store.connection import Breaker, Gate, RedisUnavailable, make_client
from proxy.store.entitlements import Entitlements
from proxy.store.writes import Actor, Writes
from tests.conftest import free_port, wait_until

ACTOR = Actor("test-operator", "test")
LONG = CacheConfig(ttl_seconds=60, stale_if_error_seconds=300, max_entries=1000)


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def lookups(result: str) -> float:
    return sample("access_proxy_cache_lookups_total", {"result": result})


def redis_errors(op: str) -> float:
    return sample("access_proxy_redis_errors_total", {"op": op})


async def command_calls(client: aioredis.Redis) -> dict[str, int]:
    """Calls per command since the server started, leaving out the INFO used to read them."""
    stats = await client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name != "cmdstat_info"
    }


def run_without_suspending(coro: Coroutine[Any, Any, Any]) -> Any:
    """Drive ``coro`` one step; it must finish there, i.e. it never awaited anything pending."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("the coroutine suspended: it waited on I/O")


class Replica:
    """One process's worth of store reads: a client, a gate with its breaker, a cache."""

    def __init__(
        self, url: str, *, timeout_s: float = 2.0, failures: int = 1000, reset_s: float = 1.0
    ):
        self.client = make_client(url, timeout_s=timeout_s)
        self.breaker = Breaker(failures, reset_s)
        self.gate = Gate(timeout_s, self.breaker)
        self.cache: FactCache[Any] = FactCache(1000)
        self.entitlements = Entitlements(self.client, self.gate, self.cache)

    async def close(self) -> None:
        await self.client.aclose()


async def seed(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        writes = Writes(client)
        await writes.create_org(ACTOR, "org1", "Org one")
        await writes.create_workspace(ACTOR, "ws1", "org1", "Workspace one")
        await writes.create_grant(ACTOR, "gpt-5.6-preview", "api", "workspace:ws1", None, None)
    finally:
        await client.aclose()


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def replica(redis_url: str) -> AsyncIterator[Replica]:
    r = Replica(redis_url)
    try:
        yield r
    finally:
        await r.close()


# --------------------------------------------------------------------------- hits and misses


async def test_a_cache_hit_makes_no_redis_round_trip(
    redis_url: str, admin: aioredis.Redis, replica: Replica
) -> None:
    await seed(redis_url)
    ent = replica.entitlements
    first = await ent.facts_for("ws1", LONG)
    assert isinstance(first, Facts)
    assert first.workspace.org_id == "org1" and first.org is not None
    assert ("gpt-5.6-preview", "api") in first.workspace_grants
    await ent.key("k-unknown", LONG)  # an unknown key is a fact too, and cached as such

    before = await command_calls(admin)
    hits = lookups("hit")
    for _ in range(100):
        # Each lookup completes in a single step: there is nothing it could be waiting on.
        assert run_without_suspending(ent.facts_for("ws1", LONG)) == first
        assert run_without_suspending(ent.key("k-unknown", LONG)) is None
    for _ in range(20):
        assert await ent.facts_for("ws1", LONG) == first
    after = await command_calls(admin)

    assert after == before, "a cache hit reached Redis"
    # Five entries per workspace (workspace, org, two grant maps, standing) plus the key.
    assert lookups("hit") - hits == 100 * 6 + 20 * 5


async def test_concurrent_misses_for_one_entry_share_one_read(
    redis_url: str, admin: aioredis.Redis, replica: Replica
) -> None:
    await seed(redis_url)
    ent = replica.entitlements
    before = await command_calls(admin)
    misses = lookups("miss")

    results = await asyncio.gather(*(ent.facts_for("ws1", LONG) for _ in range(50)))
    keys = await asyncio.gather(*(ent.key("k1", LONG) for _ in range(50)))

    after = await command_calls(admin)
    assert all(r == results[0] for r in results) and results[0] is not None
    assert keys == [None] * 50
    # One read per entry: hgetall for workspace, org and both grant maps, one for the key, and
    # one pipelined hgetall + zrange for the standing.
    assert after.get("hgetall", 0) - before.get("hgetall", 0) == 6
    assert after.get("zrange", 0) - before.get("zrange", 0) == 1
    assert lookups("miss") - misses == 6


async def test_the_ttl_bounds_staleness_of_a_change_that_was_not_published(
    redis_url: str, admin: aioredis.Redis, replica: Replica
) -> None:
    await seed(redis_url)
    ttl = 0.3
    cc = CacheConfig(ttl, 300, 1000)
    loaded_from = time.monotonic()
    facts = await replica.entitlements.facts_for("ws1", cc)
    assert facts is not None and not facts.workspace.suspended

    # A change that bypasses the publication (as if the message were lost).
    await admin.hset(schema.workspace_key("ws1"), "suspended", "1")

    async def sees_the_change() -> bool:
        now = await replica.entitlements.facts_for("ws1", cc)
        assert now is not None
        if now.workspace.suspended:
            # The old entry may only have been replaced once it was older than the ttl.
            assert time.monotonic() - loaded_from >= ttl
        return now.workspace.suspended

    await wait_until(sees_the_change, timeout=ttl + 5, message="change seen within the ttl")


async def test_a_load_that_raced_an_invalidation_answers_but_is_not_stored(
    redis_url: str, admin: aioredis.Redis
) -> None:
    await admin.set("ap:test:value", "old")
    cache: FactCache[Any] = FactCache(100)
    started, release = asyncio.Event(), asyncio.Event()
    reads: list[str] = []

    def reader(gated: bool) -> Callable[[], Awaitable[bytes | str | None]]:
        async def read() -> bytes | str | None:
            if gated:
                started.set()
                await release.wait()
            reads.append("gated" if gated else "fresh")
            return await admin.get("ap:test:value")

        return read

    raced = asyncio.create_task(cache.load("ap:test:value", reader(True), 60))
    await started.wait()
    await admin.set("ap:test:value", "new")
    cache.invalidate("ap:test:value")
    # A lookup after the invalidation does not join the read that started before it.
    assert await cache.load("ap:test:value", reader(False), 60) == b"new"
    release.set()
    assert await raced == b"new"  # its caller still gets an answer
    assert reads == ["fresh", "gated"]
    assert cache.fresh("ap:test:value", 60) == b"new"
    assert len(cache) == 1

    # Invalidated while the only read is in flight: nothing is stored.
    started.clear()
    release.clear()
    again = asyncio.create_task(cache.load("ap:test:other", reader(True), 60))
    await started.wait()
    cache.invalidate("ap:test:other")
    release.set()
    await again
    assert cache.fresh("ap:test:other", 60) is MISSING


# --------------------------------------------------------------------------- Redis away


async def test_stale_if_error_serves_known_facts_and_fails_closed_for_the_rest(
    private_redis: RedisServer,
) -> None:
    await seed(private_redis.url)
    replica = Replica(private_redis.url)
    ent = replica.entitlements
    short = CacheConfig(ttl_seconds=0.05, stale_if_error_seconds=0.5, max_entries=1000)
    # The same entries, judged with a stale window far longer than this test can take.
    patient = CacheConfig(ttl_seconds=0.05, stale_if_error_seconds=300, max_entries=1000)
    try:
        load_started = time.monotonic()
        known = await ent.facts_for("ws1", short)
        load_ended = time.monotonic()
        assert known is not None
        await private_redis.stop()

        stale, closed = (
            lookups("stale"),
            sample("access_proxy_failure_mode_total", {"check": "entitlement", "mode": "closed"}),
        )
        await wait_until(
            lambda: time.monotonic() - load_ended > patient.ttl_seconds,
            message="entries older than the ttl",
        )
        assert await ent.facts_for("ws1", patient) == known
        assert lookups("stale") - stale == 5
        assert (
            sample("access_proxy_failure_mode_total", {"check": "entitlement", "mode": "stale"})
            >= 5
        )

        with pytest.raises(EntitlementUnavailable):
            await ent.facts_for("ws-never-seen", patient)
        with pytest.raises(EntitlementUnavailable):
            await ent.key("key-never-seen", patient)
        assert (
            sample("access_proxy_failure_mode_total", {"check": "entitlement", "mode": "closed"})
            - closed
            == 2
        )

        async def fails_past_the_window() -> bool:
            asked = time.monotonic()
            try:
                served = await ent.facts_for("ws1", short)
            except EntitlementUnavailable:
                # Refused only once some entry was older than the stale window.
                assert time.monotonic() - load_started >= short.stale_if_error_seconds
                return True
            # Served only while every entry was younger than the stale window.
            assert asked - load_ended < short.stale_if_error_seconds
            assert served == known
            return False

        await wait_until(fails_past_the_window, timeout=10, interval=0.02)

        await private_redis.start()

        async def available() -> bool:
            try:
                return await ent.facts_for("ws1", short) == known
            except EntitlementUnavailable:
                return False

        await wait_until(available, message="facts after Redis returns")
    finally:
        await replica.close()


async def test_a_redis_restart_fails_no_lookup(private_redis: RedisServer) -> None:
    await seed(private_redis.url)
    replica = Replica(private_redis.url, failures=1)
    # No stale window: a failed read cannot hide behind an old entry.
    cc = CacheConfig(ttl_seconds=0.05, stale_if_error_seconds=0, max_entries=1000)
    ops = ("workspace", "org", "grants", "standing")
    try:
        # The pooled connections are open to the Redis that is about to restart.
        assert await replica.entitlements.facts_for("ws1", cc) is not None
        loaded = time.monotonic()
        await private_redis.stop()
        await private_redis.start()
        await wait_until(lambda: time.monotonic() - loaded > cc.ttl_seconds, message="past the ttl")
        errors = sum(redis_errors(op) for op in ops)

        # Every entry is re-read, over connections that the old Redis closed.
        facts = await replica.entitlements.facts_for("ws1", cc)
        assert facts is not None and facts.workspace.org_id == "org1"
        assert sum(redis_errors(op) for op in ops) == errors
        assert not replica.breaker.is_open
    finally:
        await replica.close()


async def test_the_breaker_stops_calling_a_redis_that_does_not_answer(
    private_redis: RedisServer,
) -> None:
    await seed(private_redis.url)
    replica = Replica(private_redis.url, timeout_s=0.2, failures=3, reset_s=2.0)
    ent, gate, breaker = replica.entitlements, replica.gate, replica.breaker
    calls = 0

    async def ping() -> bool:
        nonlocal calls
        calls += 1
        return bool(await replica.client.ping())

    async def answers() -> bool:
        try:
            return await gate.call("probe", ping)
        except RedisUnavailable:
            return False

    try:
        await wait_until(answers, timeout=10, message="Redis answers through the gate")
        pid = private_redis.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # Redis still accepts connections but answers nothing
        try:
            errors = redis_errors("key")
            for i in range(3):
                with pytest.raises(EntitlementUnavailable, match="TimeoutError"):
                    await ent.key(f"k{i}", LONG)
            assert redis_errors("key") - errors == 3

            # Open: the call is refused in the same step, before any Redis call is attempted.
            assert breaker.is_open
            calls_before, probe_errors = calls, redis_errors("probe")
            for _ in range(5):
                with pytest.raises(RedisUnavailable, match="circuit open"):
                    run_without_suspending(gate.call("probe", ping))
            assert calls == calls_before
            assert redis_errors("probe") - probe_errors == 5
            with pytest.raises(EntitlementUnavailable, match="circuit open"):
                await ent.key("k-while-open", LONG)
            assert redis_errors("key") - errors == 4
        finally:
            os.kill(pid, signal.SIGCONT)

        await wait_until(answers, timeout=10, interval=0.05, message="breaker closes again")
        assert not breaker.is_open
        assert await ent.key("k-after", LONG) is None
    finally:
        await replica.close()


async def test_a_cancelled_trial_call_does_not_keep_the_breaker_open(redis_url: str) -> None:
    breaker = Breaker(1, 0.2)
    gate = Gate(5.0, breaker)
    refused = make_client(f"redis://127.0.0.1:{free_port()}/0", timeout_s=1.0)
    blocking = make_client(redis_url, timeout_s=None)
    working = make_client(redis_url, timeout_s=1.0)
    try:
        with pytest.raises(RedisUnavailable):
            await gate.call("probe", refused.ping)
        assert breaker.is_open

        async def trial_let_through() -> bool:
            try:
                await gate.call("probe", lambda: blocking.blpop(["ap:test:never"], timeout=0))
            except RedisUnavailable:
                return False
            return True

        # Past reset_s one trial call goes through; it blocks in Redis until cancelled.
        trial: asyncio.Task[bool] | None = None

        async def trial_started() -> bool:
            nonlocal trial
            if trial is None or trial.done():
                trial = asyncio.create_task(trial_let_through())
            info = await working.info("clients")
            return int(info["blocked_clients"]) == 1

        await wait_until(trial_started, message="a trial call blocked in Redis")
        assert trial is not None
        trial.cancel()
        with pytest.raises(asyncio.CancelledError):
            await trial

        async def another_trial_succeeds() -> bool:
            try:
                return bool(await gate.call("probe", working.ping))
            except RedisUnavailable:
                return False

        await wait_until(another_trial_succeeds, timeout=3, message="breaker takes a new trial")
        assert not breaker.is_open
    finally:
        for client in (refused, blocking, working):
            await client.aclose()
