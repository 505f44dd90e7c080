"""Usage and cost metering (SPEC §10) over real parts: the mock upstream on loopback, a stand-in
proxy that forwards to it and meters each answer as the data-plane handler does, real Redis (one
stopped and started again mid-test), the metrics registry, the admin API and its CLI."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import REGISTRY

from proxy.config import Price, Pricing, Timeouts, Upstream
from proxy.dataplane.client import UpstreamPool
from proxy.dataplane.forward import forward
from proxy.metering import Meter
from proxy.mock_upstream import MockUpstream
from proxy.redis_server import RedisServer
from proxy.store.connection import make_client
from proxy.store.usage import UsageStore
from tests.conftest import free_port, wait_until
from tests.integration.conftest import TOKENS, run_cli, start_admin

PRICING = Pricing(
    cache_write_multiplier=1.25,
    cached_input_discount=0.9,
    models=MappingProxyType(
        {
            "gpt-5.6-sol": Price(input=15.0, output=60.0, cached_input=None, cache_write=None),
            "gpt-5.6-luna": Price(input=1.0, output=4.0, cached_input=0.5, cache_write=1.0),
        }
    ),
)
# prompt 1000 (400 cached, 100 written to the cache), completion 200
TOKENS_1000 = {"prompt": 1000, "cached": 400, "write": 100, "completion": 200}
SOL_COST = 0.021975  # 500 × 15 + 400 × 1.5 + 100 × 18.75 + 200 × 60, per 1M
LUNA_COST = 0.0016  # 500 × 1 + 400 × 0.5 + 100 × 1 + 200 × 4, per 1M
DEADLINE = 10.0


@dataclass
class Rig:
    """The stand-in proxy in front of the mock upstream, metering into ``meter``."""

    url: str
    session: aiohttp.ClientSession
    meter: Meter

    async def call(
        self,
        path: str,
        body: dict[str, Any],
        *,
        workspace: str,
        program: str | None,
        prompt: int,
        cached: int,
        write: int,
        completion: int,
    ) -> bytes:
        headers = {
            "x-workspace": workspace,
            "x-program": program or "",
            "x-mock-prompt-tokens": str(prompt),
            "x-mock-cached-tokens": str(cached),
            "x-mock-cache-write-tokens": str(write),
            "x-mock-completion-tokens": str(completion),
        }
        async with self.session.post(self.url + path, json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.read()


async def start_rig(meter: Meter) -> tuple[Rig, list[Any]]:
    mock = MockUpstream()
    await mock.start()
    upstream = Upstream("models", mock.url, None, Timeouts(5.0, 5.0, 5.0))
    upstream_pool = UpstreamPool()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers: CIMultiDict[str] = CIMultiDict({"content-type": "application/json"})
        for name, value in request.headers.items():
            if name.lower().startswith("x-mock-"):
                headers.add(name, value)
        result = await forward(
            request,
            pool=upstream_pool,
            upstream=upstream,
            url_path=request.raw_path,
            body=body,
            headers=headers,
            extra_response_headers=None,
            strip_response_headers=frozenset(),
            on_upstream_headers=None,
        )
        meter.record(
            request.headers["x-workspace"],
            request.headers["x-program"] or None,
            "api",
            json.loads(body)["model"],
            result,
            PRICING,
        )
        return result.response

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    rig = Rig(f"http://127.0.0.1:{port}", aiohttp.ClientSession(), meter)
    return rig, [rig.session, runner, upstream_pool, mock]


async def close_all(parts: list[Any]) -> None:
    for part in parts:
        if isinstance(part, web.AppRunner):
            await part.cleanup()
        elif isinstance(part, MockUpstream):
            await part.stop()
        else:
            await part.close()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def tokens_metric(program: str, kind: str) -> float:
    return sample("access_proxy_tokens_total", program=program, kind=kind)


def chat(model: str, *, stream: bool = False, include_usage: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
    if stream:
        body["stream"] = True
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return body


def responses(model: str, *, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "input": "hello"}
    if stream:
        body["stream"] = True
    return body


@pytest.fixture
async def store(redis_client: redis.asyncio.Redis) -> UsageStore:
    return UsageStore(redis_client)


@pytest.fixture
async def rig(store: UsageStore) -> AsyncIterator[Rig]:
    meter = Meter(store)
    meter.start()
    rig, parts = await start_rig(meter)
    try:
        yield rig
    finally:
        await meter.stop()
        await close_all(parts)


async def test_usage_adds_up_per_workspace_and_per_program(rig: Rig, store: UsageStore) -> None:
    program = "usage-test-adds-up"
    kinds = ("input", "cached_input", "cache_write", "output")
    before = {kind: tokens_metric(program, kind) for kind in kinds}
    before_none = tokens_metric("none", "input")
    cost_before = sample("access_proxy_cost_usd_total", program=program, product="api")

    ws = dict(workspace="acme-dev", program=program, **TOKENS_1000)
    await rig.call("/v1/chat/completions", chat("gpt-5.6-sol"), **ws)
    streamed = await rig.call(
        "/v1/chat/completions", chat("gpt-5.6-sol", stream=True, include_usage=True), **ws
    )
    assert streamed.endswith(b"data: [DONE]\n\n")  # the client got the whole stream
    await rig.call("/v1/responses", responses("gpt-5.6-luna", stream=True), **ws)
    # A stream without include_usage carries no usage: not metered.
    await rig.call("/v1/chat/completions", chat("gpt-5.6-sol", stream=True), **ws)
    # An unpriced model on another workspace, without a program: tokens counted, cost 0.
    await rig.call(
        "/v1/responses",
        responses("gpt-4o-mini"),
        workspace="globex-dev",
        program=None,
        prompt=30,
        cached=0,
        write=0,
        completion=7,
    )

    async def written() -> bool:
        a, g = await store.read("acme-dev"), await store.read("globex-dev")
        return bool(a["requests"] == 3 and g["requests"] == 1)

    await wait_until(written, DEADLINE)
    acme = await store.read("acme-dev")
    assert acme["tokens"] == {
        "input": 1500,
        "cached_input": 1200,
        "cache_write": 300,
        "output": 600,
    }
    assert acme["cost_usd"] == pytest.approx(2 * SOL_COST + LUNA_COST, abs=1e-12)
    assert set(acme["models"]) == {"gpt-5.6-sol", "gpt-5.6-luna"}
    sol, luna = acme["models"]["gpt-5.6-sol"], acme["models"]["gpt-5.6-luna"]
    assert sol["requests"] == 2
    assert sol["tokens"] == {"input": 1000, "cached_input": 800, "cache_write": 200, "output": 400}
    assert sol["cost_usd"] == pytest.approx(2 * SOL_COST, abs=1e-12)
    assert luna["requests"] == 1
    assert luna["tokens"] == {"input": 500, "cached_input": 400, "cache_write": 100, "output": 200}
    assert luna["cost_usd"] == pytest.approx(LUNA_COST, abs=1e-12)
    globex = await store.read("globex-dev")
    assert globex["tokens"] == {"input": 30, "cached_input": 0, "cache_write": 0, "output": 7}
    assert globex["cost_usd"] == 0.0
    assert globex["models"]["gpt-4o-mini"]["requests"] == 1
    assert await store.read("nobody") == {
        "requests": 0,
        "tokens": {"input": 0, "cached_input": 0, "cache_write": 0, "output": 0},
        "cost_usd": 0.0,
        "models": {},
    }

    # Metrics were counted when the answers were metered, per program.
    expected = {"input": 1500, "cached_input": 1200, "cache_write": 300, "output": 600}
    for kind in kinds:
        assert tokens_metric(program, kind) - before[kind] == expected[kind], kind
    assert tokens_metric("none", "input") - before_none == 30
    cost = sample("access_proxy_cost_usd_total", program=program, product="api") - cost_before
    assert cost == pytest.approx(2 * SOL_COST + LUNA_COST, abs=1e-12)


async def test_stop_flushes_what_is_pending(store: UsageStore) -> None:
    meter = Meter(store)
    meter.start()
    rig, parts = await start_rig(meter)
    try:
        ws = dict(workspace="acme-dev", program="usage-test-stop", **TOKENS_1000)
        await asyncio.gather(
            *(rig.call("/v1/chat/completions", chat("gpt-5.6-sol"), **ws) for _ in range(20))
        )
        await meter.stop()
        assert meter.pending == 0
        usage = await store.read("acme-dev")
        assert usage["requests"] == 20
        assert usage["tokens"]["output"] == 20 * 200
        assert usage["cost_usd"] == pytest.approx(20 * SOL_COST, abs=1e-12)
    finally:
        await meter.stop()
        await close_all(parts)


async def test_usage_written_while_redis_is_away_lands_when_it_returns(
    private_redis: RedisServer,
) -> None:
    client = make_client(private_redis.url, timeout_s=0.5)
    store = UsageStore(client)
    meter = Meter(store, retry_initial_s=0.02, retry_max_s=0.2)
    meter.start()
    rig, parts = await start_rig(meter)
    try:
        ws = dict(workspace="acme-dev", program="usage-test-outage", **TOKENS_1000)
        await rig.call("/v1/chat/completions", chat("gpt-5.6-sol"), **ws)
        await wait_until(lambda: _requests(store, "acme-dev", 1), DEADLINE)

        errors_before = sample("access_proxy_redis_errors_total", op="usage")
        await private_redis.stop()
        # Answers keep flowing (the client is never delayed) and their usage is kept.
        await rig.call("/v1/chat/completions", chat("gpt-5.6-sol", stream=True), **ws)
        for path, body in (
            ("/v1/chat/completions", chat("gpt-5.6-sol")),
            ("/v1/chat/completions", chat("gpt-5.6-sol", stream=True, include_usage=True)),
            ("/v1/responses", responses("gpt-5.6-sol")),
            ("/v1/responses", responses("gpt-5.6-sol", stream=True)),
        ):
            started = time.monotonic()
            await rig.call(path, body, **ws)
            assert time.monotonic() - started < 2.0
        await rig.call(
            "/v1/responses",
            responses("gpt-5.6-luna"),
            workspace="acme-dev",
            program="usage-test-outage",
            prompt=10,
            cached=0,
            write=0,
            completion=1,
        )
        await wait_until(
            lambda: sample("access_proxy_redis_errors_total", op="usage") > errors_before + 1,
            DEADLINE,
            message="a usage write failed and was retried",
        )
        # Pending increments are coalesced per workspace and model: six answers, two entries.
        assert meter.pending == 2

        await private_redis.start()
        await wait_until(lambda: _requests(store, "acme-dev", 6), DEADLINE)
        usage = await store.read("acme-dev")
        assert usage["tokens"] == {
            "input": 5 * 500 + 10,
            "cached_input": 5 * 400,
            "cache_write": 5 * 100,
            "output": 5 * 200 + 1,
        }
        assert usage["models"]["gpt-5.6-sol"]["requests"] == 5
        assert usage["models"]["gpt-5.6-luna"]["requests"] == 1
        luna_cost = (10 * 1.0 + 1 * 4.0) / 1_000_000
        assert usage["cost_usd"] == pytest.approx(5 * SOL_COST + luna_cost, abs=1e-12)
        assert meter.pending == 0
    finally:
        await meter.stop()
        await close_all(parts)
        await client.aclose()


async def _requests(store: UsageStore, ws: str, n: int) -> bool:
    try:
        usage = await store.read(ws)
    except (redis.RedisError, OSError):
        return False
    return bool(usage["requests"] == n)


async def test_stop_gives_up_at_its_deadline_while_redis_is_away() -> None:
    client = make_client(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    meter = Meter(UsageStore(client), retry_initial_s=0.02, retry_max_s=0.1)
    meter.start()
    rig, parts = await start_rig(meter)
    try:
        ws = dict(workspace="acme-dev", program="usage-test-deadline", **TOKENS_1000)
        await rig.call("/v1/chat/completions", chat("gpt-5.6-sol"), **ws)
        assert meter.pending == 1
        started = time.monotonic()
        await meter.stop(timeout=0.3)
        assert time.monotonic() - started < 3.0
        assert meter.pending == 1  # kept, not silently dropped
    finally:
        await meter.stop()
        await close_all(parts)
        await client.aclose()


async def test_admin_api_and_cli_answer_the_totals(
    redis_client: redis.asyncio.Redis, store: UsageStore
) -> None:
    admin, admin_runner = await start_admin(redis_client)
    meter = Meter(store)
    meter.start()
    rig, parts = await start_rig(meter)
    try:
        await admin.org("acme")
        await admin.workspace("acme-dev", "acme")
        empty = await admin.ok("dashboards", "GET", "/admin/v1/workspaces/acme-dev/usage")
        assert empty == {
            "workspace": "acme-dev",
            "requests": 0,
            "tokens": {"input": 0, "cached_input": 0, "cache_write": 0, "output": 0},
            "cost_usd": 0.0,
            "models": {},
        }
        ws = dict(workspace="acme-dev", program="usage-test-admin", **TOKENS_1000)
        await rig.call("/v1/chat/completions", chat("gpt-5.6-sol"), **ws)
        await rig.call("/v1/responses", responses("gpt-5.6-sol", stream=True), **ws)
        await wait_until(lambda: _requests(store, "acme-dev", 2), DEADLINE)

        answer = await admin.ok("dashboards", "GET", "/admin/v1/workspaces/acme-dev/usage")
        assert answer["workspace"] == "acme-dev"
        assert answer["requests"] == 2
        assert answer["tokens"] == {
            "input": 1000,
            "cached_input": 800,
            "cache_write": 200,
            "output": 400,
        }
        assert answer["cost_usd"] == pytest.approx(2 * SOL_COST, abs=1e-12)
        assert answer["models"]["gpt-5.6-sol"]["requests"] == 2
        assert await admin.ok("ops", "GET", "/admin/v1/workspaces/acme-dev/usage") == answer

        status, data = await admin.call("dashboards", "GET", "/admin/v1/workspaces/nope/usage")
        assert status == 404 and data["error"]["code"] == "not_found"
        status, data = await admin.call(
            "dashboards", "GET", "/admin/v1/workspaces/acme-dev/usage", params={"x": "1"}
        )
        assert status == 422 and data["error"]["param"] == "x"
        status, _ = await admin.call(None, "GET", "/admin/v1/workspaces/acme-dev/usage")
        assert status == 401

        rc, out, err = await run_cli(admin, "usage", "show", "acme-dev", token="dashboards")
        assert rc == 0, err
        assert "acme-dev" in out and "gpt-5.6-sol" in out
        assert "0.043950" in out and "800" in out
        rc, out, err = await run_cli(admin, "--json", "usage", "show", "acme-dev")
        assert rc == 0, err
        assert json.loads(out) == answer
        rc, _, err = await run_cli(admin, "usage", "show", "nope")
        assert rc == 1 and "not found" in err
        assert TOKENS["dashboards"][1] == ("viewer",)
    finally:
        await meter.stop()
        await close_all(parts)
        await admin.session.close()
        await admin_runner.cleanup()
