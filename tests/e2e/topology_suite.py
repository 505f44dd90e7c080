"""What the Sentinel and Cluster test modules share: the e2e stack on a topology's URL, a flushed
client for the admin tests (fixtures over the module's own ``topology`` fixture), and the
failover-under-load scenario (SPEC §5, issue 12).

Failover under load: two ``serve`` replicas answer a steady stream of requests with a known key
(one per replica), an unknown key and a key revoked before the failover, while the master that
holds the admin state (and the known keys' rate limit buckets) is SIGKILLed. Then: known keys got
200 throughout, unknown and revoked keys never did, rate limits fell back to the local share
(counted in ``failure_mode``) and came back exact; afterwards a write succeeds and the revocation
it makes is refused on both replicas within the propagation bound.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
import redis.asyncio
from redis.exceptions import RedisError

from proxy.identity import new_key
from proxy.store.routing import slot_of
from proxy.store.schema import workspace_tag
from proxy.store.topology import Topology
from tests.conftest import wait_until
from tests.e2e.conftest import (
    ACTOR,
    Seeder,
    ServeProcess,
    Stack,
    Tenant,
    metric_samples,
    request,
    start_mock,
    start_serve,
)

MODEL = "gpt-4o-mini"  # in no program: the default limit below applies
RPM = 60000
# Generous: each replica's local share (limit / live replicas, and other tests' processes on the
# same Redis count) must stay above the paced load, so a refusal would be a real fault.
LIMITS = {
    "rate_limits": {
        "enabled": True,
        "default": {"requests_per_minute": RPM, "burst": 2000, "concurrent": 100},
    },
}
PROPAGATION_LIMIT_S = 1.0  # the target is 100 ms; the bound keeps the test deterministic
FAILOVER_DEADLINE_S = 30.0


class Topo(Protocol):
    url: str

    def flush(self) -> None: ...

    def kill_master(self) -> Any: ...

    def wait_failover(self, old_port: int, deadline_s: float = ...) -> None: ...


@contextmanager
def topology_stack(url: str, workdir: Path, dead_upstream_url: str) -> Iterator[Stack]:
    """The e2e ``stack`` (mock upstream and one proxy) on the topology at ``url``."""
    mock = start_mock(workdir)
    try:
        proxy = start_serve(
            workdir, upstream_url=mock.url, redis_url=url, dead_upstream_url=dead_upstream_url
        )
        try:
            yield Stack(mock, proxy, url, dead_upstream_url, workdir)
        finally:
            code = proxy.stop()
            assert code == 0, f"serve exited with {code} on SIGTERM:\n{proxy.log()}"
    finally:
        mock.stop()


@pytest.fixture(scope="module")
def stack(
    topology: Topo, dead_upstream_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with topology_stack(topology.url, tmp_path_factory.mktemp("e2e"), dead_upstream_url) as s:
        yield s


@pytest.fixture
def redis_url(topology: Topo) -> str:
    topology.flush()
    return topology.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    topo = Topology(redis_url)
    try:
        yield topo.client(None)
    finally:
        await topo.aclose()


async def tenant_in(seed: Seeder, wanted: Callable[[int], bool]) -> Tenant:
    """A tenant whose workspace's traffic slot satisfies ``wanted``."""
    org = await seed.org()
    while True:
        ws_id = "ws-" + uuid.uuid4().hex[:10]
        if wanted(slot_of(workspace_tag(ws_id))):
            break
    await seed.writes.create_workspace(ACTOR, ws_id, org, ws_id)
    key_id, key = await seed.key(ws_id)
    return Tenant(org, ws_id, key_id, key)


@dataclass
class Outcome:
    at: float
    replica: str
    kind: str
    status: int
    limit: str | None


async def _local_mode(http: aiohttp.ClientSession, proxy: ServeProcess) -> float:
    return sum(
        v
        for name, labels, v in await metric_samples(http, proxy.admin_url)
        if name == "access_proxy_failure_mode_total"
        and labels == {"check": "rate_limit", "mode": "local"}
    )


async def _readyz(http: aiohttp.ClientSession, proxy: ServeProcess) -> dict[str, Any]:
    async with http.get(proxy.admin_url + "/readyz") as resp:
        body: dict[str, Any] = await resp.json()
        return body


async def failover_under_load(
    topo: Topo,
    old_port: int,
    pair: tuple[ServeProcess, ServeProcess],
    seed: Seeder,
    http: aiohttp.ClientSession,
    on_victim: Callable[[int], bool],
) -> dict[str, float]:
    a = pair[0]
    known = {p.data_url: await tenant_in(seed, on_victim) for p in pair}
    revoked = await seed.tenant()
    await seed.revoke_key(revoked.key_id)
    unknown_key = new_key()[1]
    for proxy in pair:
        for tenant in known.values():
            answer = await request(http, proxy.data_url, key=tenant.key, model=MODEL)
            assert answer.status == 200, answer
            assert answer.headers["x-ratelimit-limit-requests"] == str(RPM)
        assert (await request(http, proxy.data_url, key=revoked.key, model=MODEL)).status == 401
        assert (await request(http, proxy.data_url, key=unknown_key, model=MODEL)).status == 401
    local_before = [await _local_mode(http, p) for p in pair]

    outcomes: list[Outcome] = []
    stop = asyncio.Event()

    async def load(proxy: ServeProcess) -> None:
        mine = known[proxy.data_url].key
        while not stop.is_set():
            # A new unknown key each time: one never looked up, so no cached "no such key".
            keys = (("known", mine), ("unknown", new_key()[1]), ("revoked", revoked.key))
            for kind, key in keys:
                answer = await request(http, proxy.data_url, key=key, model=MODEL)
                limit = answer.headers.get("x-ratelimit-limit-requests")
                now = time.monotonic()
                outcomes.append(Outcome(now, proxy.data_url, kind, answer.status, limit))
            await asyncio.sleep(0.01)  # pacing: stay well under the local share of the rate

    loads = [asyncio.create_task(load(p)) for p in pair]
    try:
        await wait_until(lambda: len(outcomes) > 60, timeout=20, message="load running")
        killed_at = time.monotonic()
        topo.kill_master()
        await asyncio.to_thread(topo.wait_failover, old_port, FAILOVER_DEADLINE_S)
        promoted_at = time.monotonic()

        def exact_again() -> bool:
            return all(
                any(
                    o.replica == p.data_url
                    and o.kind == "known"
                    and o.at > promoted_at
                    and o.limit == str(RPM)
                    for o in outcomes
                )
                for p in pair
            )

        await wait_until(exact_again, timeout=FAILOVER_DEADLINE_S, message="exact limits again")
        exact_at = time.monotonic()
    finally:
        stop.set()
        await asyncio.gather(*loads)

    by_kind: dict[str, list[Outcome]] = {}
    for o in outcomes:
        by_kind.setdefault(o.kind, []).append(o)
    assert all(o.status == 200 for o in by_kind["known"]), [
        (o.status, o.at - killed_at) for o in by_kind["known"] if o.status != 200
    ]
    assert all(o.status in (401, 503) for o in by_kind["unknown"])
    assert all(o.status in (401, 503) for o in by_kind["revoked"])
    unavailable = [o for o in by_kind["unknown"] if o.status == 503]
    local = [o for o in by_kind["known"] if o.limit != str(RPM)]
    assert local, "no answer was limited by the local share during the failover"
    # The share is the limit over the replicas last seen alive (the stack's own proxy counts too).
    assert {o.limit for o in local} <= {str(RPM // n) for n in range(2, 9)}, local
    local_after = [await _local_mode(http, p) for p in pair]
    assert sum(local_after) > sum(local_before)
    last_local = max(o.at for o in local)

    # After the failover: both replicas subscribed again, a write succeeds, its revocation is
    # refused by both within the bound.
    await wait_until(
        _all_subscribed(http, pair), timeout=FAILOVER_DEADLINE_S, message="subscribed again"
    )
    target = known[a.data_url]
    for proxy in pair:
        assert (await request(http, proxy.data_url, key=target.key, model=MODEL)).status == 200
    write_started = time.monotonic()

    async def revoke() -> bool:
        try:
            await seed.revoke_key(target.key_id)
        except RedisError:
            return False
        return True

    await wait_until(revoke, timeout=FAILOVER_DEADLINE_S, message="a write succeeds")
    written = time.monotonic()

    async def refused_everywhere() -> bool:
        for proxy in pair:
            answer = await request(http, proxy.data_url, key=target.key, model=MODEL)
            if answer.status != 401:
                return False
        return True

    await wait_until(refused_everywhere, timeout=5.0, message="revocation refused everywhere")
    propagated = time.monotonic() - written
    assert propagated < PROPAGATION_LIMIT_S, propagated

    numbers = {
        "requests": len(outcomes),
        "known_200": len(by_kind["known"]),
        "unknown_503": len(unavailable),
        "local_share_answers": len(local),
        "promoted_after_s": promoted_at - killed_at,
        "local_share_until_s": last_local - killed_at,
        "exact_again_after_s": exact_at - killed_at,
        "first_write_after_s": written - killed_at,
        "write_retries_s": written - write_started,
        "revocation_propagation_ms": propagated * 1000,
        "failure_mode_local_counted": sum(local_after) - sum(local_before),
    }
    print()
    print("failover under load: " + ", ".join(f"{k}={v:.3g}" for k, v in numbers.items()))
    return numbers


def _all_subscribed(http: aiohttp.ClientSession, pair: tuple[ServeProcess, ...]) -> Any:
    async def check() -> bool:
        for proxy in pair:
            body = await _readyz(http, proxy)
            if body.get("invalidation") != "subscribed" or body.get("redis") != "ok":
                return False
        return True

    return check
