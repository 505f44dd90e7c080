"""The memo of a warm entitlement lookup against a real Redis (SPEC §5): ``facts_for`` and ``key``
answer from one memo per workspace and key, and that memo answers exactly what the cache entries
it stands on would. Every way an entry stops answering is tried against it: an invalidation, a
change the cache was never told of (bounded by the ttl), a shorter ttl asked, ``revalidate_all``,
a flush, LRU eviction, and a read that raced an invalidation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import identity
from proxy.config import CacheConfig
from proxy.policy import Facts
from proxy.redis_server import RedisServer
from proxy.store import schema
from proxy.store.cache import MISSING, FactCache
from proxy.store.connection import Breaker, Gate, make_client
from proxy.store.entitlements import Entitlements
from proxy.store.facts import FactReader
from proxy.store.writes import Actor, Writes
from tests.conftest import wait_until

ACTOR = Actor("test-operator", "test")
PEPPERS = identity.parse_peppers("v1:cache-memo-test-pepper-0123456789")
LONG = CacheConfig(ttl_seconds=60, stale_if_error_seconds=300, max_entries=1000)
ALWAYS_REREAD = CacheConfig(ttl_seconds=0, stale_if_error_seconds=300, max_entries=1000)
WORKSPACES = ("ws1", "ws2")  # both in org1: they share the org's entries


class Replica:
    def __init__(self, url: str, max_entries: int = 1000) -> None:
        self.client = make_client(url, timeout_s=5.0)
        self.admin = make_client(url, timeout_s=5.0)
        self.cache: FactCache[Any] = FactCache(max_entries)
        self.entitlements = Entitlements(self.client, Gate(5.0, Breaker(1000, 1.0)), self.cache)
        self.writes = Writes(self.admin)
        self.read = FactReader(self.admin)

    async def close(self) -> None:
        await self.client.aclose()
        await self.admin.aclose()


async def seed(writes: Writes) -> list[str]:
    await writes.create_org(ACTOR, "org1", "")
    for ws in WORKSPACES:
        await writes.create_workspace(ACTOR, ws, "org1", "")
    await writes.create_grant(ACTOR, "gpt-5.6-preview", "api", "workspace:ws1", None, None)
    return [(await writes.issue_key(ACTOR, ws, "", PEPPERS))[0] for ws in WORKSPACES]


def fact_keys(ws: str) -> tuple[str, ...]:
    return (
        schema.c_ws(ws),
        schema.c_org("org1"),
        schema.c_grants("workspace:" + ws),
        schema.c_grants("org:org1"),
        schema.c_standing(ws),
    )


async def expected_facts(r: Replica, ws: str, cc: CacheConfig) -> Facts:
    """What the lookup must answer, entry by entry as the cache holds them: a fresh entry
    answers, anything else is what Redis holds now."""
    reads = (
        r.read.workspace(ws),
        r.read.org("org1"),
        r.read.grants("workspace:" + ws),
        r.read.grants("org:org1"),
        r.read.standing(ws),
    )
    parts = []
    for key, read in zip(fact_keys(ws), reads, strict=True):
        held = r.cache.fresh(key, cc.ttl_seconds)
        stored = await read
        parts.append(stored if held is MISSING else held)
    return Facts(*parts)


async def calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return sum(int(v["calls"]) for name, v in stats.items() if name != "cmdstat_info")


@pytest.fixture
async def replica(redis_url: str) -> AsyncIterator[Replica]:
    r = Replica(redis_url)
    await r.admin.flushall()
    try:
        yield r
    finally:
        await r.close()


OPS = st.one_of(
    st.tuples(
        st.just("lookup"), st.sampled_from(WORKSPACES), st.sampled_from([LONG, LONG, ALWAYS_REREAD])
    ),
    st.tuples(st.just("key"), st.integers(0, 1), st.sampled_from([LONG, ALWAYS_REREAD])),
    st.tuples(st.just("suspend_ws"), st.sampled_from(WORKSPACES), st.booleans()),
    st.tuples(st.just("suspend_org"), st.just("org1"), st.booleans()),
    st.tuples(st.just("grant"), st.sampled_from(["workspace:ws1", "workspace:ws2", "org:org1"])),
    st.tuples(st.just("revoke"), st.integers(0, 1)),
    st.tuples(st.just("invalidate"), st.sampled_from(WORKSPACES), st.integers(0, 4)),
    st.tuples(st.just("invalidate_key"), st.integers(0, 1)),
    st.tuples(st.just("revalidate_all")),
    st.tuples(st.just("clear")),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(OPS, min_size=1, max_size=25), max_entries=st.sampled_from([5, 7, 1000]))
async def test_a_memo_answers_exactly_what_the_entries_would(
    redis_server: RedisServer, ops: list[tuple[Any, ...]], max_entries: int
) -> None:
    """Changes are made without telling the cache (a lost publication) unless an op invalidates
    them: each lookup must answer the cached entries that are still fresh and Redis for the rest,
    whatever memo was made before. A small cache evicts on almost every lookup."""
    r = Replica(redis_server.url, max_entries)
    try:
        await r.admin.flushall()
        key_ids = await seed(r.writes)
        programs: list[str] = []
        for ws in WORKSPACES:
            assert await r.entitlements.facts_for(ws, LONG) is not None
        for op in ops:
            kind = op[0]
            if kind == "lookup":
                _, ws, cc = op
                expected = await expected_facts(r, ws, cc)
                assert await r.entitlements.facts_for(ws, cc) == expected, op
            elif kind == "key":
                _, n, cc = op
                ck = schema.c_key(key_ids[n])
                held = r.cache.fresh(ck, cc.ttl_seconds)
                want = await r.read.key(key_ids[n]) if held is MISSING else held
                assert await r.entitlements.key(key_ids[n], cc) == want, op
            elif kind == "suspend_ws":
                await r.writes.set_workspace_suspended(ACTOR, op[1], op[2], "test")
            elif kind == "suspend_org":
                await r.writes.set_org_suspended(ACTOR, op[1], op[2], "test")
            elif kind == "grant":
                program = f"program-{len(programs)}"  # a new grant each time
                programs.append(program)
                await r.writes.create_grant(ACTOR, program, "api", op[1], None, None)
            elif kind == "revoke":
                await r.writes.revoke_key(ACTOR, key_ids[op[1]])
            elif kind == "invalidate":
                r.cache.invalidate(fact_keys(op[1])[op[2]])
            elif kind == "invalidate_key":
                r.cache.invalidate(schema.c_key(key_ids[op[1]]))
            elif kind == "revalidate_all":
                r.cache.revalidate_all()
            else:
                r.cache.clear()
        assert len(r.cache) <= max_entries
    finally:
        await r.close()


async def test_each_invalidation_is_seen_by_the_next_lookup(replica: Replica) -> None:
    key_ids = await seed(replica.writes)
    ent = replica.entitlements
    facts = await ent.facts_for("ws1", LONG)
    assert facts is not None and not facts.workspace.suspended
    assert (await ent.key(key_ids[0], LONG)) is not None

    await replica.writes.set_workspace_suspended(ACTOR, "ws1", True, "test")
    assert await ent.facts_for("ws1", LONG) == facts  # not told yet: the entry answers
    replica.cache.invalidate(schema.c_ws("ws1"))
    now = await ent.facts_for("ws1", LONG)
    assert now is not None and now.workspace.suspended

    await replica.writes.set_org_suspended(ACTOR, "org1", True, "test")
    replica.cache.invalidate(schema.c_org("org1"))
    now = await ent.facts_for("ws1", LONG)
    assert now is not None and now.org is not None and now.org.suspended

    await replica.writes.create_grant(ACTOR, "gpt-5.6-preview", "api", "org:org1", None, None)
    replica.cache.invalidate(schema.c_grants("org:org1"))
    now = await ent.facts_for("ws1", LONG)
    assert now is not None and ("gpt-5.6-preview", "api") in now.org_grants

    await replica.writes.revoke_key(ACTOR, key_ids[0])
    replica.cache.invalidate(schema.c_key(key_ids[0]))
    rec = await ent.key(key_ids[0], LONG)
    assert rec is not None and rec.revoked


async def test_a_warm_lookup_rereads_once_its_oldest_entry_is_past_the_ttl(
    replica: Replica,
) -> None:
    await seed(replica.writes)
    ent = replica.entitlements
    assert await ent.facts_for("ws1", LONG) is not None
    loaded = time.monotonic()  # every entry was read before this
    before = await calls(replica.admin)
    assert await ent.facts_for("ws1", LONG) is not None
    assert await calls(replica.admin) == before  # the memo answered: no read
    # A shorter ttl (the WebSocket sweep asks one) than the entries' age: every entry is re-read.
    await wait_until(lambda: time.monotonic() - loaded > 0.05, message="entries 50 ms old")
    younger = CacheConfig(ttl_seconds=0.05, stale_if_error_seconds=300, max_entries=1000)
    before = await calls(replica.admin)
    assert await ent.facts_for("ws1", younger) is not None
    # hgetall for workspace, org and both grant maps, and the standing's pipelined pair.
    assert await calls(replica.admin) - before >= 5


async def test_revalidate_all_and_clear_make_the_next_lookup_reread(replica: Replica) -> None:
    key_ids = await seed(replica.writes)
    ent = replica.entitlements
    assert await ent.facts_for("ws1", LONG) is not None
    await replica.writes.set_workspace_suspended(ACTOR, "ws1", True, "test")
    await replica.writes.revoke_key(ACTOR, key_ids[0])
    assert (await ent.key(key_ids[0], LONG)) is not None

    replica.cache.revalidate_all()
    facts = await ent.facts_for("ws1", LONG)
    assert facts is not None and facts.workspace.suspended
    rec = await ent.key(key_ids[0], LONG)
    assert rec is not None and rec.revoked

    await replica.writes.set_workspace_suspended(ACTOR, "ws1", False, "test")
    replica.cache.clear()
    facts = await ent.facts_for("ws1", LONG)
    assert facts is not None and not facts.workspace.suspended


async def test_an_entry_read_again_for_one_workspace_is_seen_by_another(
    replica: Replica,
) -> None:
    """ws1 and ws2 share their org's entries: when a lookup for ws1 re-reads the org (a shorter
    ttl asked), ws2's next lookup answers the org as it is cached now, not as its memo saw it."""
    await seed(replica.writes)
    ent = replica.entitlements
    for ws in WORKSPACES:
        assert await ent.facts_for(ws, LONG) is not None
    await replica.writes.set_org_suspended(ACTOR, "org1", True, "test")  # nobody told the cache
    ws1 = await ent.facts_for("ws1", ALWAYS_REREAD)
    assert ws1 is not None and ws1.org is not None and ws1.org.suspended
    ws2 = await ent.facts_for("ws2", LONG)
    assert ws2 is not None and ws2.org is not None and ws2.org.suspended


async def test_an_evicted_entry_is_read_again(redis_url: str) -> None:
    r = Replica(redis_url, max_entries=5)
    try:
        await r.admin.flushall()
        await seed(r.writes)
        assert await r.entitlements.facts_for("ws1", LONG) is not None
        await r.writes.set_workspace_suspended(ACTOR, "ws1", True, "test")
        # ws2's entries push ws1's out of a cache of five.
        assert await r.entitlements.facts_for("ws2", LONG) is not None
        assert r.cache.fresh(schema.c_ws("ws1"), 60) is MISSING
        facts = await r.entitlements.facts_for("ws1", LONG)
        assert facts is not None and facts.workspace.suspended
    finally:
        await r.close()


async def test_a_lookup_that_raced_an_invalidation_is_not_memoised(replica: Replica) -> None:
    """The workspace entry is invalidated while the same lookup still reads the org and grants:
    that lookup may answer what it read, but the next one must read the workspace again."""
    await seed(replica.writes)
    ent, cache = replica.entitlements, replica.cache
    lookup = asyncio.create_task(ent.facts_for("ws1", LONG))

    def workspace_stored() -> bool:
        return cache.fresh(schema.c_ws("ws1"), 60) is not MISSING

    await wait_until(workspace_stored, interval=0, message="workspace entry stored")
    assert not lookup.done()  # it still has the org, grants and standing to read
    await replica.writes.set_workspace_suspended(ACTOR, "ws1", True, "test")
    cache.invalidate(schema.c_ws("ws1"))
    raced = await lookup
    assert raced is not None and not raced.workspace.suspended
    now = await ent.facts_for("ws1", LONG)
    assert now is not None and now.workspace.suspended


async def test_a_read_that_raced_an_invalidation_gives_no_memo(redis_url: str) -> None:
    admin = aioredis.Redis.from_url(redis_url)
    cache: FactCache[Any] = FactCache(100)
    started, release = asyncio.Event(), asyncio.Event()

    async def gated_read() -> Any:
        started.set()
        await release.wait()
        return await admin.get("ap:test:memo")

    try:
        await admin.set("ap:test:memo", "old")
        raced = asyncio.create_task(cache.load("ap:test:memo", gated_read, 60))
        await started.wait()
        cache.invalidate("ap:test:memo")
        release.set()
        value = await raced
        assert cache.memo(value, (("ap:test:memo", value),)) is None

        stored = await cache.load("ap:test:memo", lambda: admin.get("ap:test:memo"), 60)
        # The entry is back (read after the invalidation), but it is not what the raced read saw.
        assert stored == value and stored is not value
        assert cache.memo(value, (("ap:test:memo", value),)) is None
        memo = cache.memo("derived", (("ap:test:memo", stored),))
        assert memo is not None and cache.recall(memo, 60) == "derived"
        assert cache.recall(memo, 0) is MISSING  # past any ttl
        cache.invalidate("ap:test:memo")
        assert cache.recall(memo, 60) is MISSING
    finally:
        await admin.aclose()
