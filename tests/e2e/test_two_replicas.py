"""Two ``serve`` processes on one Redis (SPEC §5): a change written through ``Writes`` on one side
is refused by the other replica's warm cache within the propagation target; and SIGTERM drains
a stream in flight while ``/readyz`` says 503, then exits 0 (SPEC §2).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import aiohttp
import pytest

from tests.conftest import wait_until
from tests.e2e.conftest import (
    Seeder,
    ServeProcess,
    Stack,
    Tenant,
    assert_allowed,
    assert_error,
    chat_body,
    metric_samples,
    request,
)

MODEL = "gpt-5.6-sol"
TRIALS_PER_CHANGE = 7
PROPAGATION_LIMIT_S = 1.0  # the target is 100 ms; the bound keeps the test deterministic


@dataclass(frozen=True)
class Replicas:
    a: ServeProcess
    b: ServeProcess


@pytest.fixture(scope="module")
def replicas(stack: Stack) -> Iterator[Replicas]:
    b = stack.start_serve("replica-b")
    try:
        yield Replicas(stack.proxy, b)
    finally:
        code = b.stop()
        assert code == 0, f"replica b exited with {code}:\n{b.log()}"


Change = Callable[[Seeder, Tenant, str], Awaitable[None]]


async def _revoke_key(seed: Seeder, tenant: Tenant, grant_id: str) -> None:
    await seed.revoke_key(tenant.key_id)


async def _suspend_workspace(seed: Seeder, tenant: Tenant, grant_id: str) -> None:
    await seed.suspend_workspace(tenant.workspace)


async def _revoke_grant(seed: Seeder, tenant: Tenant, grant_id: str) -> None:
    await seed.grant_action(grant_id, "revoke")


CHANGES: dict[str, tuple[Change, str]] = {
    "key revoked": (_revoke_key, "invalid_api_key"),
    "workspace suspended": (_suspend_workspace, "workspace_suspended"),
    "grant revoked": (_revoke_grant, "model_not_found"),
}


async def test_changes_reach_the_other_replica_within_the_target(
    replicas: Replicas, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    measured: dict[str, list[float]] = {name: [] for name in CHANGES}
    for trial in range(TRIALS_PER_CHANGE * len(CHANGES)):
        name = list(CHANGES)[trial % len(CHANGES)]
        change, code = CHANGES[name]
        tenant = await seed.tenant()
        grant_id = await seed.grant(f"workspace:{tenant.workspace}")
        # Warm both replicas' caches, so replica b answers from its cache until told otherwise.
        for proxy in (replicas.a, replicas.b):
            assert_allowed(await request(http, proxy.data_url, key=tenant.key, model=MODEL))
        hits = await _counter(http, replicas.b, "access_proxy_cache_lookups_total", result="hit")
        assert_allowed(await request(http, replicas.b.data_url, key=tenant.key, model=MODEL))
        warm = await _counter(http, replicas.b, "access_proxy_cache_lookups_total", result="hit")
        assert warm > hits, "replica b did not answer from its cache"
        evictions = await _counter(http, replicas.b, "access_proxy_cache_invalidations_total")

        started = time.monotonic()
        await change(seed, tenant, grant_id)
        deadline = started + 5.0
        while True:
            answer = await request(http, replicas.b.data_url, key=tenant.key, model=MODEL)
            if answer.status != 200:
                elapsed = time.monotonic() - started
                assert_error(answer, code)
                break
            assert time.monotonic() < deadline, f"{name}: replica b still allows after 5 s"
        measured[name].append(elapsed)
        evicted = await _counter(http, replicas.b, "access_proxy_cache_invalidations_total")
        assert evicted > evictions, "replica b refused without an invalidation"
        assert_error(await request(http, replicas.a.data_url, key=tenant.key, model=MODEL), code)

    everything = [t for times in measured.values() for t in times]
    print()
    for name, times in [*measured.items(), ("all", everything)]:
        print(
            f"propagation to the second replica, {name}: n={len(times)} "
            f"p50={statistics.median(times) * 1000:.1f} ms max={max(times) * 1000:.1f} ms"
        )
    assert max(everything) < PROPAGATION_LIMIT_S, measured


async def _counter(
    http: aiohttp.ClientSession, proxy: ServeProcess, name: str, **labels: str
) -> float:
    return sum(
        value
        for sample, got, value in await metric_samples(http, proxy.admin_url)
        if sample == name and all(got.get(k) == v for k, v in labels.items())
    )


async def test_sigterm_drains_a_stream_in_flight(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    proxy = stack.start_serve("drain")
    tenant = await seed.tenant()
    chunks, delay_ms = 8, 250
    events: list[bytes] = []
    try:
        resp = await http.post(
            proxy.data_url + "/v1/chat/completions",
            json=chat_body("gpt-4o-mini", stream=True),
            headers={
                "Authorization": f"Bearer {tenant.key}",
                "x-mock-chunks": str(chunks),
                "x-mock-chunk-delay-ms": str(delay_ms),
            },
        )
        async with resp:
            assert resp.status == 200
            assert resp.headers.get("x-request-id")
            events.append(await resp.content.readuntil(b"\n\n"))
            proxy.terminate()

            async def draining() -> bool:
                async with http.get(proxy.admin_url + "/readyz") as ready:
                    doc = await ready.json()
                    return ready.status == 503 and doc["draining"] is True

            await wait_until(draining, timeout=5.0, interval=0.02)
            # No new connections while draining (a fresh pool: no idle connection to reuse).
            async with aiohttp.ClientSession() as fresh:
                with pytest.raises(aiohttp.ClientConnectionError):
                    await request(fresh, proxy.data_url, key=tenant.key, model="gpt-4o-mini")
            rest = await resp.content.read()
        events += [e + b"\n\n" for e in rest.split(b"\n\n") if e]
        assert len(events) == chunks + 2, events
        assert events[-1] == b"data: [DONE]\n\n"
        code = proxy.wait_exit()
        assert code == 0, proxy.log()
    finally:
        if proxy.proc.poll() is None:
            proxy.stop()
