"""One ordering for a grant, three readers: for every generated grant the state the admin API
shows, the answer ``explain`` gives and the answer the real data plane gives agree (SPEC §3.4
rows 6–9, §4).

The admin API, the data plane and the mock upstream run on loopback on an event loop in a
background thread, so hypothesis can drive them from a plain test function.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.errors import CODES
from proxy.mock_upstream import MockUpstream
from proxy.policy import GrantState
from proxy.policy.grants import ANSWER
from proxy.redis_server import RedisServer
from tests.integration.conftest import Admin, Plane, start_admin, start_plane

T = TypeVar("T")
HOUR = 3600.0
PROGRAMS = {"gpt-5.6-preview": ("provider", "government"), "gpt-5.5-alpha": ("provider",)}
PREVIEW_ON = {"gpt-5.6-preview": ("api", "codex"), "gpt-5.5-alpha": ("api",)}  # phase preview
APPROVERS = {"provider": "provider-review", "government": "gov-review"}
PREFIX = {"api": "/v1", "codex": "/codex/v1"}


@dataclass(frozen=True)
class GrantPlan:
    program: str
    product: str
    on_org: bool
    models: tuple[str, ...] | None
    signed: tuple[str, ...]  # roles that approve, each by its own reviewer
    enable: float | None  # seconds from now
    expires: float | None  # seconds from now
    suspended: bool
    revoked: bool
    asked: str  # the model the request names


MODELS = {"gpt-5.6-preview": ("gpt-5.6-sol", "gpt-5.6-terra", "gpt-5.6-luna")}
MODELS["gpt-5.5-alpha"] = ("gpt-5.5-alpha",)
OFFSETS = st.sampled_from((None, -HOUR, HOUR))


@st.composite
def grant_plans(draw: st.DrawFn) -> GrantPlan:
    program = draw(st.sampled_from(sorted(PROGRAMS)))
    models = MODELS[program]
    subset = draw(st.one_of(st.none(), st.lists(st.sampled_from(models), min_size=1, unique=True)))
    return GrantPlan(
        program=program,
        product=draw(st.sampled_from(PREVIEW_ON[program])),
        on_org=draw(st.booleans()),
        models=tuple(subset) if subset is not None else None,
        signed=tuple(draw(st.lists(st.sampled_from(PROGRAMS[program]), unique=True))),
        enable=draw(OFFSETS),
        expires=draw(OFFSETS),
        suspended=draw(st.booleans()),
        revoked=draw(st.integers(0, 4)) == 0,
        asked=draw(st.sampled_from(models)),
    )


def spec_answer(plan: GrantPlan) -> str | None:
    """SPEC §3.4 rows 6–9 in their order, straight from the plan."""
    if plan.revoked or (plan.models is not None and plan.asked not in plan.models):
        return "model_not_found"
    if set(plan.signed) != set(PROGRAMS[plan.program]):
        return "access_pending_review"
    if plan.enable is None or plan.enable > 0:
        return "access_not_yet_enabled"
    if plan.suspended:
        return "access_suspended"
    if plan.expires is not None and plan.expires < 0:
        return "access_expired"
    return None


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Stack:
    """Admin API, data plane and mock upstream on an event loop in a background thread."""

    def __init__(self, redis_url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.redis_url = redis_url
        self.ids = itertools.count()
        self.admin: Admin
        self.plane: Plane
        self.run(self._start())

    def run(self, coro: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout=120)

    async def _start(self) -> None:
        self.client = redis.asyncio.Redis.from_url(self.redis_url)
        self.upstream = MockUpstream()
        await self.upstream.start()
        self.admin, self.admin_runner = await start_admin(self.client, self.upstream.url)
        self.plane = await start_plane(self.redis_url, self.admin.holder)

    async def _stop(self) -> None:
        await self.plane.close()
        await self.admin.session.close()
        await self.admin_runner.cleanup()
        await self.upstream.stop()
        await self.client.aclose()

    def close(self) -> None:
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()

    async def make(self, plan: GrantPlan) -> tuple[dict[str, Any], str, str]:
        """A fresh org, workspace and key with the planned grant: (grant, key id, key)."""
        n = next(self.ids)
        org, ws, admin = f"ga-o{n}", f"ga-w{n}", self.admin
        await admin.org(org)
        await admin.workspace(ws, org)
        key = await admin.key(ws)
        now = time.time()
        extra: dict[str, Any] = {}
        if plan.models is not None:
            extra["models"] = list(plan.models)
        if plan.expires is not None:
            extra["expires_at"] = _rfc3339(now + plan.expires)
        subject = f"org:{org}" if plan.on_org else f"workspace:{ws}"
        gid = (await admin.grant(subject, plan.program, plan.product, **extra))["grant_id"]
        path = f"/admin/v1/grants/{gid}"
        for role in plan.signed:
            body = {"role": role, "reviewer": f"{role}-reviewer"}
            await admin.ok(APPROVERS[role], "POST", f"{path}/approve", body)
        if plan.enable is not None:
            await admin.ok("ops", "POST", f"{path}/enable", {"at": _rfc3339(now + plan.enable)})
        if plan.suspended:
            await admin.ok("ops", "POST", f"{path}/suspend", {"reason": "review"})
        if plan.revoked:
            await admin.ok("ops", "POST", f"{path}/revoke", {"reason": "ended"})
        grant = await admin.ok("dashboards", "GET", path)
        return grant, key["key_id"], key["key"]

    async def answers(self, plan: GrantPlan) -> tuple[dict[str, Any], dict[str, Any], int, Any]:
        grant, key_id, key = await self.make(plan)
        params = {"key_id": key_id, "product": plan.product, "model": plan.asked}
        explained = await self.admin.ok("dashboards", "GET", "/admin/v1/explain", params=params)
        async with self.plane.session.post(
            self.plane.url + PREFIX[plan.product] + "/chat/completions",
            json={"model": plan.asked, "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {key}"},
        ) as resp:
            return grant, explained, resp.status, await resp.json()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    server = RedisServer(tmp_path_factory.mktemp("grant-agreement"), persistent=False)
    server.start_sync()
    s = Stack(server.url)
    try:
        yield s
    finally:
        s.close()
        server.stop_sync()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=grant_plans())
def test_state_explain_and_data_plane_agree(stack: Stack, plan: GrantPlan) -> None:
    grant, explained, status, body = stack.run(stack.answers(plan))
    state = GrantState(grant["state"])
    code, rule = ANSWER[state]
    if (
        state is not GrantState.REVOKED
        and plan.models is not None
        and plan.asked not in plan.models
    ):
        code, rule = "model_not_found", "grant.model_subset"
    got = None if status == 200 else body["error"]["code"]
    assert code == spec_answer(plan), (plan, grant)
    assert (explained["code"], explained["rule"]) == (code, rule), (plan, grant, explained)
    assert got == code, (plan, grant, body)
    assert status == (200 if code is None else CODES[code].status)
    assert explained["facts"]["grants"]["org" if plan.on_org else "workspace"]["state"] == state
