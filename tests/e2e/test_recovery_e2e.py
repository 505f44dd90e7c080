"""Redis outages and their recovery under load, with two real ``serve`` replicas (SPEC §5).

- Redis is SIGKILLed while both replicas serve known keys, and started again: across the outage
  and the recovery every answer for a known key is 200 (the issue was a burst of 503s right after
  Redis came back, when the cache was dropped while the breaker was still open).
- One replica is cut off from Redis (a relay between them is cut) while a key is revoked and a
  workspace suspended through the other: once it reconnects, it enforces both within
  ``cache.ttl_seconds``; its known keys get only 200 throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from proxy.redis_server import RedisServer
from tests.conftest import wait_until
from tests.e2e.conftest import Seeder, ServeProcess, Stack, Tenant, chat_body

MODEL = "gpt-5.6-sol"
TTL_S = 2.0
OUTAGE_S = 4.5
HUGE = {"requests_per_minute": 10_000_000, "burst": 1_000_000, "concurrent": 100_000}
OVERRIDES = {
    "cache": {"ttl_seconds": TTL_S, "stale_if_error_seconds": 300},
    # A breaker that lets a trial through every 3 s: after Redis returns, the replicas resubscribe
    # (within a second) well before the breaker closes, the window where recovery used to refuse.
    "redis": {"breaker_reset_s": 3.0},
    "rate_limits": {"enabled": True, "default": HUGE, "programs": {"gpt-5.6-preview": HUGE}},
}
WORKERS = 4
PACE_S = 0.005  # between one worker's requests: load, not a flood on a shared machine


@pytest.fixture
def redis_db(tmp_path: Path) -> Iterator[RedisServer]:
    """A persistent Redis of this test's own, which it kills and starts again."""
    server = RedisServer(tmp_path / "recovery-redis")
    server.start_sync()
    try:
        yield server
    finally:
        server.stop_sync()


@pytest.fixture
async def seeder(redis_db: RedisServer) -> AsyncIterator[Seeder]:
    seed = Seeder(redis_db.url)
    try:
        yield seed
    finally:
        await seed.close()


async def known_tenants(seed: Seeder, count: int) -> list[Tenant]:
    tenants = []
    for _ in range(count):
        tenant = await seed.tenant()
        await seed.grant(f"workspace:{tenant.workspace}")
        tenants.append(tenant)
    return tenants


@dataclass
class Load:
    """Workers sending chat requests with known keys to the replicas, recording every answer."""

    http: aiohttp.ClientSession
    urls: list[str]
    keys: list[str]
    answers: list[tuple[float, str, int, str]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _worker(self, n: int) -> None:
        rng = random.Random(n)
        body = json.dumps(chat_body(MODEL)).encode()
        while not self._stop.is_set():
            url = self.urls[rng.randrange(len(self.urls))]
            key = rng.choice(self.keys)
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            async with self.http.post(
                url + "/v1/chat/completions", data=body, headers=headers
            ) as resp:
                raw = await resp.read()
                code = "ok"
                if resp.status != 200:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        code = json.loads(raw)["error"]["code"]
                self.answers.append((time.monotonic(), url, resp.status, code))
            await asyncio.sleep(PACE_S)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Load]:
        tasks = [asyncio.create_task(self._worker(n)) for n in range(WORKERS)]
        try:
            yield self
        finally:
            self._stop.set()
            await asyncio.gather(*tasks)

    def since(self, t: float) -> list[tuple[float, str, int, str]]:
        return [a for a in self.answers if a[0] >= t]

    def failures(self) -> list[tuple[float, str, int, str]]:
        return [a for a in self.answers if a[2] != 200]


async def readyz(http: aiohttp.ClientSession, serve: ServeProcess) -> dict[str, object]:
    async with http.get(serve.admin_url + "/readyz") as resp:
        doc: dict[str, object] = await resp.json()
        return doc


async def recovered(http: aiohttp.ClientSession, serve: ServeProcess) -> bool:
    doc = await readyz(http, serve)
    return doc["redis"] == "ok" and doc["invalidation"] == "subscribed"


def summary(load: Load, since: float) -> str:
    counts = Counter((status, code) for _, _, status, code in load.since(since))
    return ", ".join(f"{status} {code}: {n}" for (status, code), n in sorted(counts.items()))


async def test_known_keys_get_only_200_across_a_redis_kill_and_restart(
    stack: Stack, redis_db: RedisServer, seeder: Seeder
) -> None:
    tenants = await known_tenants(seeder, 4)
    a = stack.start_serve("recovery-a", redis_url=redis_db.url, overrides=OVERRIDES)
    b = stack.start_serve("recovery-b", redis_url=redis_db.url, overrides=OVERRIDES)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            load = Load(http, [a.data_url, b.data_url], [t.key for t in tenants])
            async with load.running():
                await wait_until(lambda: len(load.answers) >= 100, timeout=30, message="warm")
                assert redis_db.pid is not None
                killed = time.monotonic()
                os.kill(redis_db.pid, signal.SIGKILL)
                redis_db.stop_sync()  # reaps it
                # Long enough that every entry is past its ttl and re-read against a dead Redis,
                # and not a multiple of the breaker's reset: it is open when Redis returns.
                await wait_until(
                    lambda: time.monotonic() - killed > OUTAGE_S and len(load.since(killed)) >= 100,
                    timeout=60,
                    message="served through the outage",
                )
                restarted = time.monotonic()
                redis_db.start_sync()
                for serve in (a, b):
                    await wait_until(
                        lambda s=serve: recovered(http, s), timeout=30, message="recovered"
                    )
                back = time.monotonic()
                await wait_until(
                    lambda: time.monotonic() - back > TTL_S * 1.5 and len(load.since(back)) >= 100,
                    timeout=60,
                    message="served after the recovery",
                )
            print(
                f"\noutage {restarted - killed:.1f} s: {summary(load, killed)}; "
                f"recovery (restart to both subscribed) {back - restarted:.2f} s"
            )
            assert load.failures() == [], summary(load, 0)
            assert len(load.since(restarted)) >= 100
        for serve in (a, b):
            assert "Traceback" not in serve.log(), serve.log()
    finally:
        assert a.stop() == 0, a.log()
        assert b.stop() == 0, b.log()


class Relay:
    """A TCP relay to Redis that the test can cut (every connection closed, new ones refused)
    and restore on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


async def test_a_replica_cut_off_from_redis_enforces_what_changed_within_the_ttl(
    stack: Stack, redis_db: RedisServer, seeder: Seeder
) -> None:
    known = await known_tenants(seeder, 3)
    revoked, suspended = await known_tenants(seeder, 2)
    relay = Relay(redis_db.port)
    await relay.start()
    # In a thread: the relay runs on this loop, and start_serve waits for /readyz through it.
    a = await asyncio.to_thread(
        stack.start_serve, "cutoff-a", redis_url=relay.url, overrides=OVERRIDES
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:

            async def status(key: str) -> int:
                async with http.post(
                    a.data_url + "/v1/chat/completions",
                    json=chat_body(MODEL),
                    headers={"Authorization": f"Bearer {key}"},
                ) as resp:
                    await resp.read()
                    return resp.status

            for tenant in (revoked, suspended):
                assert await status(tenant.key) == 200  # cached on a
            load = Load(http, [a.data_url], [t.key for t in known])
            async with load.running():
                await wait_until(lambda: len(load.answers) >= 50, timeout=30, message="warm")
                await relay.cut()
                await wait_until(
                    lambda: _true(readyz(http, a), lambda d: d["redis"] == "unreachable"),
                    timeout=30,
                    message="a is cut off",
                )
                # Changed while a cannot hear of it.
                await seeder.revoke_key(revoked.key_id)
                await seeder.suspend_workspace(suspended.workspace)
                await wait_until(
                    lambda: len(load.answers) >= 50 + 50, timeout=30, message="served while cut"
                )
                await relay.start()
                restored = time.monotonic()
                await wait_until(lambda: recovered(http, a), timeout=30, message="reconnected")
                reconnected = time.monotonic()
                await wait_until(
                    lambda: _true(status(revoked.key), lambda s: s == 401),
                    timeout=TTL_S + 10,
                    interval=0.05,
                    message="revoked key refused",
                )
                key_after = time.monotonic() - reconnected
                await wait_until(
                    lambda: _true(status(suspended.key), lambda s: s == 403),
                    timeout=TTL_S + 10,
                    interval=0.05,
                    message="suspension enforced",
                )
                suspension_after = time.monotonic() - reconnected
                await wait_until(
                    lambda: len(load.since(reconnected)) >= 50, timeout=30, message="served after"
                )
            print(
                f"\nreconnected {reconnected - restored:.2f} s after the relay came back; "
                f"revocation enforced {key_after:.2f} s and suspension {suspension_after:.2f} s "
                f"after reconnecting (ttl {TTL_S} s); known keys: {summary(load, 0)}"
            )
            assert key_after <= TTL_S and suspension_after <= TTL_S
            assert load.failures() == [], summary(load, 0)
        assert "Traceback" not in a.log(), a.log()
    finally:
        assert await asyncio.to_thread(a.stop) == 0, a.log()
        with contextlib.suppress(Exception):
            await relay.cut()


async def _true(value: object, test: object) -> bool:
    got = await value  # type: ignore[misc]
    return bool(test(got))  # type: ignore[operator]
