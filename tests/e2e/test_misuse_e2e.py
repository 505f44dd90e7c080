"""Stricter handling for repeated misuse (SPEC §6) end to end: two ``access-proxy serve`` replicas
on one Redis, the mock upstream emitting the safety-flag header, and a real classifier on
loopback. Flags arrive through the admin API and through the upstream header (streamed, not
streamed, and from a client that hung up mid-stream) and walk one workspace up the whole ladder,
each step seen on both replicas: normal → watch (with a shadow tier counted, not enforced) →
restricted → cooldown → restricted again by the clock → suspended → still suspended when cleared →
allowed after a reinstate.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import wait_until
from tests.e2e.conftest import (
    PREVIEW,
    Answer,
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
FLAG_HEADER = "x-safety-flag"
BLOCK_SECONDS = 2
PROPAGATION_S = 5.0  # the target is 100 ms; the bound keeps the test deterministic
OPS_TOKEN = "e2e-misuse-ops-token-0123456789"
VIEWER_TOKEN = "e2e-misuse-viewer-token-012345"
HIGH_LIMIT = {"requests_per_minute": 60000, "burst": 5000, "concurrent": 100}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Classifier:
    """Answers ``cyber`` for any body that says "exploit"; counts the calls."""

    url: str = ""
    calls: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        text = (await request.read()).decode()
        return web.json_response({"categories": ["cyber"] if "exploit" in text else []})


def overrides(classifier_url: str) -> dict[str, Any]:
    return {
        "admin": {
            "tokens": [
                {"name": "ops", "sha256": _sha(OPS_TOKEN), "roles": ["operator"]},
                {"name": "dashboards", "sha256": _sha(VIEWER_TOKEN), "roles": ["viewer"]},
            ]
        },
        "cache": {"ttl_seconds": 30},  # only the invalidations can make a change seen in time
        "misuse": {
            "window_seconds": 3600,
            "upstream_flag_header": FLAG_HEADER,
            "classifier": {"url": classifier_url, "timeout_ms": 2000, "fail_mode": "closed"},
            "tiers": [
                {"name": "watch", "min_score": 1},
                # A stricter rule being tried on live traffic: a cooldown from score 2.
                {"name": "probation", "min_score": 2, "block_seconds": 600, "shadow": True},
                {
                    "name": "restricted",
                    "min_score": 3,
                    "rate_limit_factor": 0.5,
                    "blocked_categories": ["cyber"],
                },
                {"name": "cooldown", "min_score": 5, "block_seconds": BLOCK_SECONDS},
                {"name": "suspended", "min_score": 8},
            ],
        },
        "rate_limits": {"default": HIGH_LIMIT, "programs": {PREVIEW: HIGH_LIMIT}},
    }


@dataclass
class World:
    a: ServeProcess
    b: ServeProcess
    classifier: Classifier
    http: aiohttp.ClientSession
    tenant: Tenant
    replicas: tuple[ServeProcess, ServeProcess] = field(init=False)

    def __post_init__(self) -> None:
        self.replicas = (self.a, self.b)

    async def admin(
        self, method: str, path: str, body: Any = None, token: str = OPS_TOKEN
    ) -> tuple[int, Any]:
        async with self.http.request(
            method,
            self.a.admin_url + "/admin/v1" + path,
            json=body,
            headers={"authorization": f"Bearer {token}"},
        ) as resp:
            return resp.status, await resp.json()

    async def flag(self, severity: int, note: str) -> dict[str, Any]:
        body = {"category": "cyber", "severity": severity, "source": "analyst", "note": note}
        status, data = await self.admin("POST", f"/workspaces/{self.tenant.workspace}/flags", body)
        assert status == 201, data
        result: dict[str, Any] = data
        return result

    async def audit(self, target: str) -> list[dict[str, Any]]:
        """Every audit entry about ``target``, in order."""
        found: list[dict[str, Any]] = []
        after = 0
        while True:
            status, page = await self.admin(
                "GET", f"/audit?after={after}&limit=1000", token=VIEWER_TOKEN
            )
            assert status == 200, page
            found += [e for e in page["entries"] if e["target"] == target]
            if len(page["entries"]) < 1000:
                return found
            after = page["entries"][-1]["seq"]

    async def standing(self) -> dict[str, Any]:
        status, data = await self.admin(
            "GET", f"/workspaces/{self.tenant.workspace}/standing", token=VIEWER_TOKEN
        )
        assert status == 200, data
        result: dict[str, Any] = data
        return result

    async def chat(
        self,
        proxy: ServeProcess,
        text: str = "hello there",
        *,
        stream: bool = False,
        upstream_flag: str | None = None,
    ) -> Answer:
        body = chat_body(MODEL, stream=stream)
        body["messages"][0]["content"] = text
        headers = {"x-mock-safety-flag": upstream_flag} if upstream_flag else None
        return await request(
            self.http, proxy.data_url, key=self.tenant.key, json_body=body, headers=headers
        )

    async def until_answer(self, code: str, text: str = "hello there") -> None:
        """Wait until both replicas answer ``code`` (``ok`` for 200)."""
        for proxy in self.replicas:
            seen: list[int] = []

            async def answers(proxy: ServeProcess = proxy, seen: list[int] = seen) -> bool:
                answer = await self.chat(proxy, text)
                seen.append(answer.status)
                if code == "ok":
                    return answer.status == 200
                return answer.status != 200 and answer.json()["error"]["code"] == code

            await wait_until(
                answers, PROPAGATION_S, 0.02, f"{code} on port {proxy.data_port} (saw {seen[-5:]})"
            )

    async def until_score(self, score: int) -> dict[str, Any]:
        got: dict[str, Any] = {}

        async def reached() -> bool:
            got.update(await self.standing())
            return bool(got["score"] == score)

        await wait_until(reached, PROPAGATION_S, 0.02, f"score {score} (saw {got.get('score')})")
        return got


async def metric(
    proxy: ServeProcess, http: aiohttp.ClientSession, name: str, **labels: str
) -> float:
    return sum(
        value
        for sample, got, value in await metric_samples(http, proxy.admin_url)
        if sample == name and all(got.get(k) == v for k, v in labels.items())
    )


@pytest.fixture
async def world(stack: Stack, seed: Seeder, http: aiohttp.ClientSession) -> AsyncIterator[World]:
    classifier = Classifier()
    app = web.Application()
    app.router.add_post("/classify", classifier.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    classifier.url = f"http://127.0.0.1:{runner.addresses[0][1]}/classify"
    started = await asyncio.gather(
        *(
            asyncio.to_thread(stack.start_serve, name, overrides=overrides(classifier.url))
            for name in ("misuse-a", "misuse-b")
        ),
        return_exceptions=True,
    )
    procs = [p for p in started if isinstance(p, ServeProcess)]
    try:
        for failure in started:
            if isinstance(failure, BaseException):
                raise failure
        tenant = await seed.tenant()
        await seed.grant(f"workspace:{tenant.workspace}")
        yield World(procs[0], procs[1], classifier, http, tenant)
    finally:
        for proc in procs:
            code = await asyncio.to_thread(proc.stop)
            assert code == 0, proc.log()
        await runner.cleanup()


async def test_the_ladder_across_two_replicas(world: World) -> None:
    a, b, http = world.a, world.b, world.http

    # normal: allowed everywhere, and nothing asks the classifier.
    for proxy in world.replicas:
        assert_allowed(await world.chat(proxy, "write me an exploit"))
    assert world.classifier.calls == 0
    assert (await world.standing())["tier"] == "normal"

    # watch, through the admin API.
    assert (await world.flag(1, "first report"))["tier"] == "watch"
    for proxy in world.replicas:
        assert_allowed(await world.chat(proxy))

    # An upstream flag on a non-streamed answer (via b): score 2 puts the workspace in the
    # shadow tier "probation", a cooldown that is counted on every request but not enforced.
    answer = await world.chat(b, upstream_flag="cyber;severity=1")
    assert_allowed(answer)
    assert FLAG_HEADER not in answer.headers
    standing = await world.until_score(2)
    assert standing["tier"] == "watch" and standing["shadow_tier"] == "probation"
    assert standing["flags"][-1]["source"] == "upstream"

    async def shadow_counted() -> bool:
        assert_allowed(await world.chat(a))
        return (
            await metric(a, http, "access_proxy_shadow_decisions_total", rule="tier:probation") > 0
        )

    await wait_until(shadow_counted, PROPAGATION_S, 0.02, "shadow decision counted on a")
    assert world.classifier.calls == 0

    # An upstream flag on a streamed answer (via a): score 3, restricted.
    answer = await world.chat(a, stream=True, upstream_flag="cyber;severity=1")
    assert answer.status == 200, answer.body[:300]
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.body.rstrip().endswith(b"data: [DONE]")
    assert FLAG_HEADER not in answer.headers
    assert (await world.until_score(3))["tier"] == "restricted"
    await world.until_answer("category_blocked", "write me an exploit")
    for proxy in world.replicas:
        assert_allowed(await world.chat(proxy, "summarise this poem"))
    assert world.classifier.calls >= 4

    # A flag on a stream whose client hangs up after the first chunk is still recorded.
    body = chat_body(MODEL, stream=True)
    async with http.post(
        b.data_url + "/v1/chat/completions",
        data=json.dumps(body),
        headers={
            "authorization": f"Bearer {world.tenant.key}",
            "content-type": "application/json",
            "x-mock-safety-flag": "fraud;severity=1",
            "x-mock-chunks": "50",
            "x-mock-chunk-delay-ms": "200",
        },
    ) as resp:
        assert resp.status == 200
        assert FLAG_HEADER not in resp.headers
        assert await resp.content.readany()
        resp.close()
    standing = await world.until_score(4)
    assert standing["tier"] == "restricted"
    assert [f["category"] for f in standing["flags"]].count("fraud") == 1

    # cooldown, through the admin API: refused with retry-after on both replicas.
    cooled = await world.flag(1, "repeat offence")
    assert cooled["tier"] == "cooldown"
    until = datetime.fromisoformat(cooled["until"].replace("Z", "+00:00")).timestamp()
    await world.until_answer("misuse_cooldown")
    for proxy in world.replicas:
        answer = await world.chat(proxy)
        if answer.status == 200:  # the block already ran out on a slow machine
            assert time.time() >= until - 0.05
            continue
        assert_error(answer, "misuse_cooldown")
        assert answer.headers["retry-after"] in {str(s) for s in range(1, BLOCK_SECONDS + 1)}

    # The block ends by the clock, with no write: handled as restricted again.
    await world.until_answer("ok")
    assert time.time() >= until - 0.05
    assert (await world.standing())["tier"] == "restricted"
    await world.until_answer("category_blocked", "write me an exploit")

    # suspended.
    assert (await world.flag(3, "confirmed abuse"))["tier"] == "suspended"
    await world.until_answer("workspace_suspended")

    # Clearing the flags does not lift the suspension.
    status, cleared = await world.admin(
        "POST", f"/workspaces/{world.tenant.workspace}/standing/clear", {"reason": "reviewed"}
    )
    assert status == 200, cleared
    assert cleared["score"] == 0 and cleared["tier"] == "suspended"
    for proxy in world.replicas:
        assert_error(await world.chat(proxy), "workspace_suspended")

    # An operator's reinstate does.
    status, _ = await world.admin(
        "POST", f"/workspaces/{world.tenant.workspace}/reinstate", {"reason": "appeal granted"}
    )
    assert status == 200
    await world.until_answer("ok")
    calls = world.classifier.calls
    for proxy in world.replicas:
        assert_allowed(await world.chat(proxy, "write me an exploit"))
    assert world.classifier.calls == calls  # normal again: the classifier is not asked

    # Metrics: flags by the process that recorded them; transitions by the process that wrote.
    flags = "access_proxy_misuse_flags_total"
    assert await metric(a, http, flags, category="cyber", source="admin") == 3
    assert await metric(a, http, flags, category="cyber", source="upstream") == 1
    assert await metric(b, http, flags, category="cyber", source="upstream") == 1
    assert await metric(b, http, flags, category="other", source="upstream") == 1
    transitions = "access_proxy_tier_transitions_total"
    for tier in ("watch", "restricted", "cooldown", "suspended", "normal"):
        assert await metric(a, http, transitions, tier=tier) == 1, tier
    assert await metric(b, http, transitions) == 0
    assert await metric(a, http, transitions, tier="probation") == 0

    # The audit log holds every step.
    entries = await world.audit(f"workspace:{world.tenant.workspace}")
    assert [e["action"] for e in entries] == [
        "workspace.create",
        *["standing.flag"] * 6,
        "standing.clear",
        "workspace.reinstate",
    ]
    assert [e["actor"] for e in entries[1:]] == [
        "ops",
        "upstream",
        "upstream",
        "upstream",
        "ops",
        "ops",
        "ops",
        "ops",
    ]
