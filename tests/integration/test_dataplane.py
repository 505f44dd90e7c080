"""``DataPlane`` on its own, in process: a real Redis, the admin API to create facts, the mock
upstream on loopback. The rows the handler enforces around ``decide`` (route, key, the
answer to a refusal, x-request-id, what reaches the upstream), its hooks and its metrics."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio
from multidict import CIMultiDictProxy
from prometheus_client import REGISTRY

from proxy.dataplane.app import Admission, Hooks, deny_response
from proxy.mock_upstream import MockUpstream
from proxy.policy import Decision
from proxy.policy.facts import Facts
from proxy.redis_server import RedisServer
from proxy.snapshot import Snapshot
from tests.integration.conftest import Admin, Plane, start_admin, start_plane

CHAT = {"model": "gpt-5.6-sol", "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Env:
    admin: Admin
    plane: Plane
    upstream: MockUpstream
    key: str
    seen_headers: list[str]
    admitted: list[Decision]
    refuse: bool = False

    async def post(self, path: str, body: Any = CHAT, **headers: str) -> tuple[int, Any, Any]:
        hdrs = {"authorization": f"Bearer {self.key}", **headers}
        async with self.plane.session.post(self.plane.url + path, json=body, headers=hdrs) as r:
            return r.status, await r.json(content_type=None), r.headers


@pytest.fixture
async def env(redis_url: str, redis_client: redis.asyncio.Redis) -> AsyncIterator[Env]:
    upstream = MockUpstream()
    await upstream.start()
    admin, runner = await start_admin(redis_client, upstream.url)
    await admin.org("acme")
    await admin.workspace("acme-dev", "acme")
    key = (await admin.key("acme-dev"))["key"]
    for product in ("api", "codex"):
        gid = (await admin.grant("workspace:acme-dev", product=product))["grant_id"]
        for role, token in (("provider", "provider-review"), ("government", "gov-review")):
            body = {"role": role, "reviewer": f"{role}-r"}
            await admin.ok(token, "POST", f"/admin/v1/grants/{gid}/approve", body)
        await admin.ok("ops", "POST", f"/admin/v1/grants/{gid}/enable")
    seen: list[str] = []
    admitted: list[Decision] = []
    state = Env(admin, None, upstream, key, seen, admitted)  # type: ignore[arg-type]

    async def admit(
        snap: Snapshot, facts: Facts, decision: Decision, body: bytes, rid: str
    ) -> Admission:
        admitted.append(decision)
        if state.refuse:
            refused = deny_response("rate_limit_exceeded", rid, None, {"retry-after": "7"})
            return Admission("rate_limit_exceeded", refused)
        return Admission(headers={"x-ratelimit-limit-requests": "120"})

    def on_headers(snap: Snapshot, facts: Facts, headers: CIMultiDictProxy[str]) -> None:
        seen.append(facts.workspace.workspace_id)

    state.plane = await start_plane(redis_url, admin.holder, Hooks(admit, on_headers))
    try:
        yield state
    finally:
        await state.plane.close()
        await admin.session.close()
        await runner.cleanup()
        await upstream.stop()


def counted(product: str, program: str, code: str) -> float:
    labels = {"product": product, "program": program, "code": code}
    return REGISTRY.get_sample_value("access_proxy_requests_total", labels) or 0.0


async def test_an_allowed_request_reaches_the_upstream_without_the_client_credential(
    env: Env,
) -> None:
    before = counted("api", "gpt-5.6-preview", "ok")
    status, body, headers = await env.post(
        "/codex/v1/chat/completions", **{"x-workspace-id": "someone-else"}
    )
    assert status == 200, body
    assert body["choices"][0]["message"]["content"]
    rid = headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", rid)
    assert headers["x-ratelimit-limit-requests"] == "120"  # set by the admission hook
    (seen,) = [r for r in env.upstream.requests if r.request_id == rid]
    assert seen.path == "/v1/chat/completions"  # the codex prefix rewritten
    assert seen.header("authorization") is None  # no upstream key configured, none forwarded
    assert seen.header("x-workspace-id") is None
    assert env.seen_headers == ["acme-dev"] and env.admitted[-1].rule == "grant.enabled"
    assert counted("codex", "gpt-5.6-preview", "ok") >= 1
    assert counted("api", "gpt-5.6-preview", "ok") == before


@pytest.mark.parametrize(
    ("path", "auth", "status", "code"),
    [
        ("/nowhere", "good", 404, "unknown_route"),
        ("/v1/chat/completions", None, 401, "invalid_api_key"),
        ("/v1/chat/completions", "Bearer sk-ap-nothex-and-too-short", 401, "invalid_api_key"),
        ("/v1/chat/completions", "Basic good", 401, "invalid_api_key"),
        ("/v1/chat/completions", "Bearer sk-ap-0123456789ab-" + "a" * 43, 401, "invalid_api_key"),
    ],
)
async def test_route_and_key_are_checked_before_anything_else(
    env: Env, path: str, auth: str | None, status: int, code: str
) -> None:
    headers = {}
    if auth is not None:
        headers["authorization"] = auth.replace("good", env.key)
    async with env.plane.session.post(env.plane.url + path, json=CHAT, headers=headers) as r:
        body = await r.json()
        assert (r.status, body["error"]["code"]) == (status, code)
        assert r.headers["x-request-id"]
    assert env.upstream.requests == [] and env.admitted == []


async def test_a_revoked_key_is_refused_once_its_cache_entry_goes(env: Env) -> None:
    key_id = env.key.split("-")[2]
    await env.admin.ok("ops", "DELETE", f"/admin/v1/keys/{key_id}", status=204)
    env.plane.dataplane.entitlements.cache.clear()  # what an invalidation does
    status, body, _ = await env.post("/v1/chat/completions")
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")


async def test_a_refusal_of_the_decision_skips_the_hooks(env: Env) -> None:
    status, body, headers = await env.post("/chatgpt/v1/chat/completions")
    assert (status, body["error"]["code"]) == (403, "product_unavailable")
    assert headers["content-type"] == "application/json"
    status, body, _ = await env.post("/v1/chat/completions", {"messages": []})
    assert (status, body["error"]["code"]) == (400, "invalid_request")
    assert env.admitted == [] and env.upstream.requests == []


async def test_a_refusal_of_the_admission_hook_is_the_answer(env: Env) -> None:
    env.refuse = True
    status, body, headers = await env.post("/v1/chat/completions")
    assert (status, body["error"]["code"]) == (429, "rate_limit_exceeded")
    assert headers["retry-after"] == "7"
    assert env.upstream.requests == []


async def test_the_model_list_shows_what_the_caller_may_use(env: Env) -> None:
    async with env.plane.session.get(
        env.plane.url + "/v1/models", headers={"authorization": f"Bearer {env.key}"}
    ) as r:
        assert r.status == 200
        ids = {m["id"] for m in (await r.json())["data"]}
    # The preview models need a grant (this workspace has one for api); alpha has none.
    assert {"gpt-5.6-sol", "gpt-5.6-terra", "gpt-5.6-luna", "gpt-4o-mini"} <= ids
    assert "gpt-5.5-alpha" not in ids


async def test_an_unreachable_upstream_is_502(
    redis_url: str, redis_client: redis.asyncio.Redis, tmp_path: Any
) -> None:
    admin, runner = await start_admin(redis_client, "http://127.0.0.1:9")
    plane = await start_plane(redis_url, admin.holder)
    try:
        await admin.org("o")
        await admin.workspace("w", "o")
        key = (await admin.key("w"))["key"]
        body = {"model": "house-model", "messages": []}
        headers = {"authorization": f"Bearer {key}"}
        async with plane.session.post(
            plane.url + "/v1/chat/completions", json=body, headers=headers
        ) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (502, "upstream_unavailable")
    finally:
        await plane.close()
        await admin.session.close()
        await runner.cleanup()


async def test_redis_away_with_nothing_cached_is_503(
    redis_client: redis.asyncio.Redis, tmp_path: Any
) -> None:
    admin, runner = await start_admin(redis_client)
    gone = RedisServer(tmp_path / "gone", persistent=False)
    await gone.start()
    url = gone.url
    await gone.stop()
    plane = await start_plane(url, admin.holder)
    try:
        headers = {"authorization": "Bearer sk-ap-0123456789ab-" + "a" * 43}
        async with plane.session.post(
            plane.url + "/v1/chat/completions", json=CHAT, headers=headers
        ) as r:
            body = await r.json()
            assert (r.status, body["error"]["code"]) == (503, "entitlement_unavailable")
    finally:
        await plane.close()
        await admin.session.close()
        await runner.cleanup()


async def test_inflight_counts_requests_in_progress(env: Env) -> None:
    assert env.plane.dataplane.inflight == 0
    status, _, _ = await env.post("/v1/chat/completions")
    assert status == 200 and env.plane.dataplane.inflight == 0
