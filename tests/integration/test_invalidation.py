"""Invalidation across replicas against a real Redis (SPEC §5): a change made through one replica
evicts the entry on another well within a second, a replica that loses its subscription makes its
whole cache stale when it subscribes again (re-read on the next lookup, still answering while
Redis cannot), and a publication it missed is still bounded by the ttl."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy import config, identity
from proxy.config import CacheConfig
from proxy.policy import Flag
from proxy.redis_server import RedisServer
from proxy.store import schema
from proxy.store.cache import MISSING, FactCache
from proxy.store.connection import Breaker, Gate, make_client
from proxy.store.entitlements import Entitlements
from proxy.store.invalidation import Subscriber
from proxy.store.schema import INVALIDATION_CHANNEL
from proxy.store.writes import Actor, Writes
from tests.conftest import wait_until

MISUSE = config.load(Path(__file__).resolve().parents[2] / "config" / "proxy.yaml").misuse
ACTOR = Actor("test-operator", "test")
PEPPERS = identity.parse_peppers("v1:invalidation-test-pepper-0123456789")
LONG = CacheConfig(ttl_seconds=60, stale_if_error_seconds=300, max_entries=1000)
# Far above the 100 ms target, so a loaded machine cannot fail it; the measured time is printed.
PROPAGATION_BOUND_S = 1.0


class Replica:
    """One process's worth of store: reads through its cache, writes, and its subscriber."""

    def __init__(self, url: str) -> None:
        self.client = make_client(url, timeout_s=2.0)
        self.admin = make_client(url, timeout_s=5.0, reconnect=True)
        self.sub_client = make_client(url, timeout_s=None)
        self.cache: FactCache[Any] = FactCache(1000)
        self.entitlements = Entitlements(self.client, Gate(2.0, Breaker(1000, 1.0)), self.cache)
        self.writes = Writes(self.admin)
        self.subscriber = Subscriber(self.sub_client, self.cache)

    async def close(self) -> None:
        await self.subscriber.stop()
        for client in (self.client, self.admin, self.sub_client):
            await client.aclose()


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[Callable[[str], Awaitable[Replica]]]:
    made: list[Replica] = []

    async def make(url: str = redis_url) -> Replica:
        replica = Replica(url)
        made.append(replica)
        return replica

    try:
        yield make
    finally:
        for replica in made:
            await replica.close()


async def subscribed(replica: Replica, count: int) -> None:
    """Wait until the subscriber is connected and Redis counts ``count`` subscribers."""
    await replica.subscriber.connected.wait()

    async def counted() -> bool:
        answer = await replica.admin.pubsub_numsub(INVALIDATION_CHANNEL)
        return bool(answer[0][1] >= count)

    await wait_until(counted, message=f"{count} subscribers on {INVALIDATION_CHANNEL}")


async def seed(writes: Writes) -> tuple[str, str]:
    await writes.create_org(ACTOR, "org1", "")
    await writes.create_workspace(ACTOR, "ws1", "org1", "")
    grant = await writes.create_grant(ACTOR, "gpt-5.6-preview", "api", "workspace:ws1", None, None)
    key_id, _ = await writes.issue_key(ACTOR, "ws1", "", PEPPERS)
    return grant.grant_id, key_id


async def propagation_time(seen: Callable[[], Awaitable[bool]], what: str) -> float:
    start = time.monotonic()
    await wait_until(seen, timeout=5, interval=0.002, message=what)
    elapsed = time.monotonic() - start
    print(f"{what}: seen on the other replica after {elapsed * 1000:.1f} ms")
    assert elapsed < PROPAGATION_BOUND_S, f"{what} took {elapsed:.3f} s"
    return elapsed


async def test_a_change_on_one_replica_evicts_the_entry_on_the_other(
    replicas: Callable[[], Awaitable[Replica]],
) -> None:
    a, b = await replicas(), await replicas()
    # Seeded before subscribing, so no late message about the seed can evict the warm entries.
    grant_id, key_id = await seed(a.writes)
    a.subscriber.start()
    b.subscriber.start()
    await subscribed(a, 2)
    await subscribed(b, 2)
    ent = b.entitlements

    async def facts() -> Any:
        found = await ent.facts_for("ws1", LONG)
        assert found is not None
        return found

    # Warm the other replica's cache; with a 60 s ttl only an invalidation can change it.
    warm = await facts()
    assert not warm.workspace.suspended
    key = await ent.key(key_id, LONG)
    assert key is not None and not key.revoked
    entries = len(b.cache)

    await a.writes.set_workspace_suspended(ACTOR, "ws1", True, "review")
    await propagation_time(
        lambda: _true(facts(), lambda f: f.workspace.suspended), "workspace suspension"
    )

    await a.writes.revoke_key(ACTOR, key_id)

    async def key_revoked() -> bool:
        record = await ent.key(key_id, LONG)
        return record is not None and record.revoked

    await propagation_time(key_revoked, "key revocation")

    await a.writes.apply_grant_action(ACTOR, grant_id, "revoke", "review")
    await propagation_time(
        lambda: _true(facts(), lambda f: f.workspace_grants[("gpt-5.6-preview", "api")].revoked),
        "grant revocation",
    )

    await a.writes.set_org_suspended(ACTOR, "org1", True, "review")
    await propagation_time(lambda: _true(facts(), lambda f: f.org.suspended), "org suspension")

    await a.writes.add_flag(ACTOR, "ws1", Flag(time.time(), "cyber", 3, "analyst"), MISUSE)
    await propagation_time(
        lambda: _true(facts(), lambda f: len(f.standing.flags) == 1), "misuse flag"
    )
    # Only the touched entries were evicted and re-read, not the whole cache.
    assert len(b.cache) == entries


async def _true(value: Awaitable[Any], test: Callable[[Any], bool]) -> bool:
    return test(await value)


def fresh_entries(replica: Replica, ttl: float = 60) -> list[str]:
    """The keys of ``ws1``'s facts that would answer now without a Redis read."""
    keys = [
        schema.c_ws("ws1"),
        schema.c_org("org1"),
        schema.c_grants("workspace:ws1"),
        schema.c_grants("org:org1"),
        schema.c_standing("ws1"),
    ]
    return [k for k in keys if replica.cache.fresh(k, ttl) is not MISSING]


async def test_a_replica_that_loses_its_subscription_revalidates_its_whole_cache(
    private_redis: RedisServer, replicas: Callable[[str], Awaitable[Replica]]
) -> None:
    b = await replicas(private_redis.url)
    await seed(b.writes)
    b.subscriber.start()
    await subscribed(b, 1)
    assert await b.entitlements.facts_for("ws1", LONG) is not None
    assert len(b.cache) == 5 and len(fresh_entries(b)) == 5

    await private_redis.stop()
    await wait_until(lambda: not b.subscriber.connected.is_set(), message="subscription lost")
    # Nothing is dropped while Redis is away: the entries serve within the stale window.
    assert len(b.cache) == 5

    await private_redis.start()
    await wait_until(b.subscriber.connected.is_set, timeout=10, message="subscribed again")
    # Every entry is stale (re-read on its next lookup) but kept as the fallback.
    assert len(b.cache) == 5 and fresh_entries(b) == []
    assert await b.entitlements.facts_for("ws1", LONG) is not None
    assert len(fresh_entries(b)) == 5


async def test_recovery_with_the_breaker_still_open_answers_from_what_is_held(
    private_redis: RedisServer,
) -> None:
    """Redis is back and the subscription resubscribed, but the breaker has not let a trial
    through yet: lookups answer from the stale entries, never EntitlementUnavailable; once the
    breaker closes they are re-read, so a change made during the outage is seen."""
    seeder = Replica(private_redis.url)
    replica = Replica(private_redis.url)
    breaker = Breaker(1, 3600.0)  # stays open until the test lets it close
    replica.entitlements = Entitlements(replica.client, Gate(2.0, breaker), replica.cache)
    try:
        await seed(seeder.writes)
        replica.subscriber.start()
        await subscribed(replica, 1)
        assert await replica.entitlements.facts_for("ws1", LONG) is not None

        # The subscription is away while Redis restarts and a change is made, so the change's
        # publication is lost to this replica, as in an outage.
        await replica.subscriber.stop()
        replica.subscriber.connected.clear()
        await private_redis.stop()
        breaker.failure()  # as the first failed hot-path call would
        assert breaker.is_open
        await private_redis.start()
        await seeder.writes.set_workspace_suspended(ACTOR, "ws1", True, "while cut off")
        replica.subscriber.start()
        await wait_until(replica.subscriber.connected.is_set, timeout=10, message="subscribed")

        for _ in range(20):
            found = await replica.entitlements.facts_for("ws1", LONG)
            assert found is not None and not found.workspace.suspended  # the held facts
        breaker.success()  # as the trial call that finds Redis back would
        found = await replica.entitlements.facts_for("ws1", LONG)
        assert found is not None and found.workspace.suspended
    finally:
        await replica.close()
        await seeder.close()


async def test_a_killed_subscription_connection_also_revalidates_the_cache(
    replicas: Callable[[str], Awaitable[Replica]], private_redis: RedisServer
) -> None:
    # A Redis of its own: the count of pub/sub clients must not see other tests' processes.
    a, b = await replicas(private_redis.url), await replicas(private_redis.url)
    await seed(a.writes)
    b.subscriber.start()
    await subscribed(b, 1)
    assert await b.entitlements.facts_for("ws1", LONG) is not None
    assert len(b.cache) == 5
    before = {c["id"] for c in await a.admin.client_list(_type="pubsub")}
    assert len(before) == 1

    assert await a.admin.client_kill_filter(_type="pubsub") == 1

    await wait_until(lambda: fresh_entries(b) == [], message="cache stale on resubscribe")
    await wait_until(b.subscriber.connected.is_set, message="subscribed again")
    after = {c["id"] for c in await a.admin.client_list(_type="pubsub")}
    assert len(after) == 1 and after != before

    # The new subscription works: a change evicts again.
    assert await b.entitlements.facts_for("ws1", LONG) is not None
    await subscribed(b, 1)
    await a.writes.set_workspace_suspended(ACTOR, "ws1", True, "review")

    async def suspended() -> bool:
        found = await b.entitlements.facts_for("ws1", LONG)
        return found is not None and found.workspace.suspended

    await propagation_time(suspended, "suspension after resubscribing")


async def test_a_lost_publication_is_bounded_by_the_ttl(
    replicas: Callable[[], Awaitable[Replica]],
) -> None:
    a, b = await replicas(), await replicas()
    await seed(a.writes)
    ttl = 0.3
    cc = CacheConfig(ttl, 300, 1000)
    # b is not subscribed: the publication of a's change never reaches it.
    loaded_from = time.monotonic()
    found = await b.entitlements.facts_for("ws1", cc)
    assert found is not None and not found.workspace.suspended
    await a.writes.set_workspace_suspended(ACTOR, "ws1", True, "review")

    async def suspended() -> bool:
        now = await b.entitlements.facts_for("ws1", cc)
        assert now is not None
        if now.workspace.suspended:
            assert time.monotonic() - loaded_from >= ttl
        return now.workspace.suspended

    await wait_until(suspended, timeout=ttl + 5, message="suspension seen within the ttl")
