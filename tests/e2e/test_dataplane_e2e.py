"""The data-plane decision table (SPEC §3.4, §4, §5) end to end over raw HTTP against a real
``access-proxy serve`` process, the mock upstream and Redis; facts are seeded through ``Writes``.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from proxy.errors import CODES
from proxy.identity import new_key
from proxy.redis_server import RedisServer
from tests.conftest import wait_until
from tests.e2e.conftest import (
    ALPHA,
    MAX_BODY_BYTES,
    NOT_FOUND_MESSAGE,
    Answer,
    Seeder,
    Stack,
    Tenant,
    assert_allowed,
    assert_error,
    chat_body,
    metric_samples,
    mock_requests,
    request,
    requests_total,
)

SOL, TERRA, LUNA = "gpt-5.6-sol", "gpt-5.6-terra", "gpt-5.6-luna"
UNLISTED = "gpt-4o-mini"


async def test_unknown_route(stack: Stack, http: aiohttp.ClientSession) -> None:
    base = stack.proxy.data_url
    assert_error(await request(http, base, "/nothing/here"), "unknown_route")
    assert_error(await request(http, base, "/v2/chat/completions", model=SOL), "unknown_route")
    assert_error(await request(http, base, "/", method="GET"), "unknown_route")


async def test_missing_malformed_unknown_and_revoked_keys(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    base = stack.proxy.data_url
    tenant = await seed.tenant()
    await seed.grant(f"workspace:{tenant.workspace}")
    assert_allowed(await request(http, base, key=tenant.key, model=SOL))
    assert_allowed(await request(http, base, key=tenant.key, model=SOL, api_key_header=True))

    _, unknown = new_key()
    wrong_secret = tenant.key[:-4] + ("aaaa" if not tenant.key.endswith("aaaa") else "bbbb")
    for bad in ("", "not-a-key", "sk-ap-zz-yy", unknown, wrong_secret):
        for api_key_header in (False, True):
            answer = await request(http, base, key=bad, model=SOL, api_key_header=api_key_header)
            assert_error(answer, "invalid_api_key")
    assert_error(await request(http, base, model=SOL), "invalid_api_key")
    for auth in ("Basic " + tenant.key, "Bearer", "Bearer    ", tenant.key):
        answer = await request(http, base, model=SOL, headers={"Authorization": auth})
        assert_error(answer, "invalid_api_key")

    await seed.revoke_key(tenant.key_id)
    for api_key_header in (False, True):

        async def refused(api_key_header: bool = api_key_header) -> bool:
            answer = await request(
                http, base, key=tenant.key, model=SOL, api_key_header=api_key_header
            )
            return answer.status == 401

        await wait_until(refused, timeout=5.0)
        answer = await request(http, base, key=tenant.key, model=SOL, api_key_header=api_key_header)
        assert_error(answer, "invalid_api_key")


async def test_workspace_and_org_suspended(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    base = stack.proxy.data_url
    suspended_ws = await seed.tenant()
    await seed.suspend_workspace(suspended_ws.workspace)
    org_id = await seed.org()
    in_suspended_org = await seed.tenant(org_id)
    await seed.suspend_org(org_id)
    for tenant in (suspended_ws, in_suspended_org):
        # Row 3 answers before any body, model or grant check.
        assert_error(
            await request(http, base, key=tenant.key, model=UNLISTED), "workspace_suspended"
        )
        assert_error(
            await request(http, base, key=tenant.key, data=b"{not json"), "workspace_suspended"
        )
        assert_error(await request(http, base, "/v1/models", key=tenant.key), "workspace_suspended")


async def test_body_too_large_invalid_json_and_missing_model(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    base = stack.proxy.data_url
    tenant = await seed.tenant()
    big = chat_body(UNLISTED, padding="x" * (MAX_BODY_BYTES + 1))
    assert_error(await request(http, base, key=tenant.key, json_body=big), "request_too_large")
    fits = chat_body(UNLISTED, padding="x" * (MAX_BODY_BYTES // 2))
    assert_allowed(await request(http, base, key=tenant.key, json_body=fits))

    for data in (b"{not json", b"\xff\xfe", b'{"messages": []}', b'{"model": ""}', b"[1, 2]"):
        answer = await request(
            http, base, key=tenant.key, data=data, headers={"Content-Type": "application/json"}
        )
        assert_error(answer, "invalid_request")
    # The key check comes first (row 2 before row 4).
    assert_error(await request(http, base, data=b"{not json"), "invalid_api_key")


async def test_closed_product(stack: Stack, seed: Seeder, http: aiohttp.ClientSession) -> None:
    base = stack.proxy.data_url
    tenant = await seed.tenant()
    subject = f"workspace:{tenant.workspace}"
    await seed.grant(subject, product="api")
    await seed.grant(subject, product="chatgpt")
    await seed.grant(subject, ALPHA, "api")
    assert_allowed(await request(http, base, key=tenant.key, model=SOL))
    answer = await request(http, base, "/chatgpt/v1/chat/completions", key=tenant.key, model=SOL)
    assert_error(answer, "product_unavailable")
    answer = await request(http, base, "/codex/v1/chat/completions", key=tenant.key, model=ALPHA)
    assert_error(answer, "product_unavailable")


async def test_grant_states(stack: Stack, seed: Seeder, http: aiohttp.ClientSession) -> None:
    base = stack.proxy.data_url
    org_id = await seed.org()

    async def with_grant(**grant: Any) -> tuple[Tenant, str]:
        tenant = await seed.tenant(org_id)
        return tenant, await seed.grant(f"workspace:{tenant.workspace}", **grant)

    no_grant = await seed.tenant(org_id)
    allowed, _ = await with_grant()
    subset, _ = await with_grant(models=(SOL, TERRA))
    requested, _ = await with_grant(approvals=())
    pending, _ = await with_grant(approvals=("provider",))
    approved_only, _ = await with_grant(enable_in=None)
    future, _ = await with_grant(enable_in=3600.0)
    expired, _ = await with_grant(expires_in=-1.0)
    suspended, suspended_grant = await with_grant()
    revoked, revoked_grant = await with_grant()
    reinstated, reinstated_grant = await with_grant()
    await seed.grant_action(suspended_grant, "suspend")
    await seed.grant_action(revoked_grant, "revoke")
    await seed.grant_action(reinstated_grant, "suspend")
    await seed.grant_action(reinstated_grant, "reinstate")

    async def call(tenant: Tenant, model: str = SOL) -> Answer:
        return await request(http, base, key=tenant.key, model=model)

    for tenant in (no_grant, revoked):
        assert_error(await call(tenant), "model_not_found", NOT_FOUND_MESSAGE)
    assert_error(await call(subset, LUNA), "model_not_found", NOT_FOUND_MESSAGE)
    assert_allowed(await call(subset, TERRA))
    for tenant in (requested, pending):
        assert_error(await call(tenant), "access_pending_review")
    for tenant in (approved_only, future):
        assert_error(await call(tenant), "access_not_yet_enabled")
    assert_error(await call(suspended), "access_suspended")
    assert_error(await call(expired), "access_expired")
    for tenant in (allowed, reinstated):
        body = assert_allowed(await call(tenant))
        assert body["model"] == SOL and body["object"] == "chat.completion"
    # A grant's check does not leak: "no grant", "revoked" and "outside the subset" look alike.
    errors = {
        json.dumps((await call(t, m)).json(), sort_keys=True)
        for t, m in ((no_grant, SOL), (revoked, SOL), (subset, LUNA))
    }
    assert len(errors) == 1, errors


async def test_workspace_grant_beats_org_grant(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    base = stack.proxy.data_url
    org_id = await seed.org()
    await seed.grant(f"org:{org_id}")
    covered = await seed.tenant(org_id)
    cut_off = await seed.tenant(org_id)
    revoked = await seed.tenant(org_id)
    narrowed = await seed.tenant(org_id)
    await seed.grant_action(await seed.grant(f"workspace:{cut_off.workspace}"), "suspend")
    await seed.grant_action(await seed.grant(f"workspace:{revoked.workspace}"), "revoke")
    await seed.grant(f"workspace:{narrowed.workspace}", models=(TERRA,))

    assert_allowed(await request(http, base, key=covered.key, model=SOL))
    assert_error(await request(http, base, key=cut_off.key, model=SOL), "access_suspended")
    assert_error(
        await request(http, base, key=revoked.key, model=SOL), "model_not_found", NOT_FOUND_MESSAGE
    )
    assert_error(
        await request(http, base, key=narrowed.key, model=SOL), "model_not_found", NOT_FOUND_MESSAGE
    )
    assert_allowed(await request(http, base, key=narrowed.key, model=TERRA))

    # And the other way round: a workspace grant where the org has none.
    other = await seed.tenant()
    await seed.grant(f"workspace:{other.workspace}")
    assert_allowed(await request(http, base, key=other.key, model=SOL))


async def test_product_grants_do_not_cross_and_codex_is_rewritten(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    base = stack.proxy.data_url
    tenant = await seed.tenant()
    subject = f"workspace:{tenant.workspace}"
    await seed.grant(subject, product="api")
    codex = "/codex/v1/chat/completions"
    assert_allowed(await request(http, base, key=tenant.key, model=SOL))
    answer = await request(http, base, codex, key=tenant.key, model=SOL)
    assert_error(answer, "model_not_found", NOT_FOUND_MESSAGE)

    await seed.grant(subject, product="codex")

    async def codex_open() -> bool:
        return (await request(http, base, codex, key=tenant.key, model=SOL)).status == 200

    await wait_until(codex_open, timeout=5.0)
    answer = await request(http, base, codex + "?trace=1", key=tenant.key, model=SOL)
    assert_allowed(answer)
    rid = answer.headers["x-request-id"]
    (seen,) = await mock_requests(http, stack.mock.url, rid)
    assert seen["path"] == "/v1/chat/completions?trace=1"
    assert seen["method"] == "POST"
    assert json.loads(seen["body"])["model"] == SOL


async def test_alpha_grant_does_not_open_the_preview(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    base = stack.proxy.data_url
    tenant = await seed.tenant()
    await seed.grant(f"workspace:{tenant.workspace}", ALPHA, "api")
    assert_allowed(await request(http, base, key=tenant.key, model=ALPHA))
    for model in (SOL, TERRA, LUNA):
        answer = await request(http, base, key=tenant.key, model=model)
        assert_error(answer, "model_not_found", NOT_FOUND_MESSAGE)


async def test_enable_at_turns_allowed_by_the_clock_alone(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    base = stack.proxy.data_url
    tenant = await seed.tenant()
    grant_id = await seed.grant(f"workspace:{tenant.workspace}", enable_in=0.6)
    grant = await seed.writes.read.grant(grant_id)
    assert grant is not None and grant.enable_at is not None
    enable_at = grant.enable_at

    async def allowed() -> bool:
        sent_at = time.time()
        answer = await request(http, base, key=tenant.key, model=SOL)
        if answer.status == 200:
            # The proxy decided after enable_at, so before this answer arrived.
            assert time.time() >= enable_at
            return True
        assert_error(answer, "access_not_yet_enabled")
        assert sent_at < enable_at + 0.05, "still refused after enable_at"
        return False

    await wait_until(allowed, timeout=5.0, interval=0.02)
    assert_allowed(await request(http, base, key=tenant.key, model=SOL))


async def test_models_list_is_filtered(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    base = stack.proxy.data_url
    tenant = await seed.tenant()
    subject = f"workspace:{tenant.workspace}"
    await seed.grant(subject, models=(SOL, TERRA))
    await seed.grant(subject, ALPHA, "api", enable_in=None)

    answer = await request(http, base, "/v1/models", key=tenant.key)
    listing = assert_allowed(answer)
    assert listing["object"] == "list"
    assert {m["id"] for m in listing["data"]} == {SOL, TERRA, UNLISTED}

    answer = await request(http, base, "/codex/v1/models", key=tenant.key)
    assert {m["id"] for m in assert_allowed(answer)["data"]} == {UNLISTED}

    answer = await request(http, base, f"/v1/models/{SOL}", key=tenant.key)
    assert assert_allowed(answer)["id"] == SOL
    answer = await request(http, base, f"/v1/models/{LUNA}", key=tenant.key)
    assert_error(answer, "model_not_found", NOT_FOUND_MESSAGE)
    assert_error(await request(http, base, "/v1/models"), "invalid_api_key")


async def test_upstream_unreachable_and_slow_first_byte(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    base = stack.proxy.data_url
    tenant = await seed.tenant()
    answer = await request(http, base, "/dead/v1/chat/completions", key=tenant.key, model=UNLISTED)
    assert_error(answer, "upstream_unavailable")
    answer = await request(http, base, "/dead/v1/models", key=tenant.key)
    assert_error(answer, "upstream_unavailable")

    started = time.monotonic()
    answer = await request(
        http,
        base,
        "/slow/v1/chat/completions",
        key=tenant.key,
        model=UNLISTED,
        headers={"x-mock-first-byte-delay-ms": "5000"},
    )
    elapsed = time.monotonic() - started
    assert_error(answer, "upstream_timeout")
    assert elapsed < 4.0, elapsed
    # Under the limit the same route answers.
    answer = await request(http, base, "/slow/v1/chat/completions", key=tenant.key, model=UNLISTED)
    assert_allowed(answer)


async def test_metrics_count_codes_with_bounded_labels(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    base, admin = stack.proxy.data_url, stack.proxy.admin_url
    tenant = await seed.tenant()
    await seed.grant(f"workspace:{tenant.workspace}", models=(SOL,))
    before = await metric_samples(http, admin)
    client_chosen = "client-" + uuid.uuid4().hex
    _, unknown_key = new_key()

    assert_allowed(await request(http, base, key=tenant.key, model=SOL))
    assert_allowed(await request(http, base, key=tenant.key, model=SOL))
    assert_error(await request(http, base, key=tenant.key, model=LUNA), "model_not_found")
    assert_error(await request(http, base, f"/{client_chosen}/x", key=tenant.key), "unknown_route")
    assert_error(await request(http, base, key=unknown_key, model=client_chosen), "invalid_api_key")
    assert_allowed(
        await request(
            http,
            base,
            f"/v1/chat/completions?user={client_chosen}",
            key=tenant.key,
            model=client_chosen,
            headers={"x-workspace-id": client_chosen, "user-agent": client_chosen},
        )
    )
    answer = await request(http, base, "/chatgpt/v1/chat/completions", key=tenant.key, model=SOL)
    assert_error(answer, "product_unavailable")

    after = await metric_samples(http, admin)

    def delta(**labels: str) -> float:
        return requests_total(after, **labels) - requests_total(before, **labels)

    assert delta(product="api", program="gpt-5.6-preview", code="ok") == 2
    assert delta(product="api", code="ok") == 3
    assert delta(product="api", code="invalid_api_key") == 1
    assert delta(code="unknown_route") == 1
    assert delta(product="chatgpt", program="gpt-5.6-preview", code="product_unavailable") == 1
    assert delta(product="api", code="model_not_found") == 1

    secrets = {
        tenant.key,
        tenant.key_id,
        tenant.workspace,
        tenant.org,
        client_chosen,
        unknown_key,
    }
    allowed_codes = set(CODES) | {"ok"}
    for name, labels, _ in after:
        if not name.startswith("access_proxy_"):
            continue
        for label, value in labels.items():
            assert not any(s in value for s in secrets), (name, label, value)
            if label == "code":
                assert value in allowed_codes, (name, value)
            if label == "product":
                assert value in {"api", "codex", "chatgpt", "none"}, (name, value)


async def test_redis_down_keeps_known_keys_within_the_stale_window(
    stack: Stack, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    private = RedisServer(tmp_path / "redis", persistent=False)
    private.start_sync()
    try:
        proxy = stack.start_serve(
            "redis-down",
            redis_url=private.url,
            overrides={"cache": {"ttl_seconds": 0.2, "stale_if_error_seconds": 300}},
        )
        try:
            seeder = Seeder(private.url)
            try:
                known = await seeder.tenant()
                await seeder.grant(f"workspace:{known.workspace}")
                never_seen = await seeder.tenant()
            finally:
                await seeder.close()
            base = proxy.data_url
            assert_allowed(await request(http, base, key=known.key, model=SOL))
            assert_allowed(await request(http, base, key=known.key, model=UNLISTED))

            private.stop_sync()
            # The cached entries outlive their TTL and are served stale while Redis is away.
            stale_before = _stale_lookups(await metric_samples(http, proxy.admin_url))

            async def served_stale() -> bool:
                assert_allowed(await request(http, base, key=known.key, model=SOL))
                samples = await metric_samples(http, proxy.admin_url)
                return _stale_lookups(samples) > stale_before

            await wait_until(served_stale, timeout=10.0, interval=0.05)
            started = time.monotonic()
            answer = await request(http, base, key=never_seen.key, model=SOL)
            assert_error(answer, "entitlement_unavailable")
            _, unknown_key = new_key()
            assert_error(
                await request(http, base, key=unknown_key, model=SOL), "entitlement_unavailable"
            )
            assert time.monotonic() - started < 2.0
            assert_allowed(await request(http, base, key=known.key, model=SOL))

            async def not_ready() -> bool:
                async with http.get(proxy.admin_url + "/readyz") as resp:
                    return resp.status == 503

            await wait_until(not_ready, timeout=5.0)
        finally:
            code = proxy.stop()
            assert code == 0, proxy.log()
    finally:
        private.stop_sync()


def _stale_lookups(samples: list[tuple[str, dict[str, str], float]]) -> float:
    return sum(
        v
        for name, labels, v in samples
        if name == "access_proxy_cache_lookups_total" and labels.get("result") == "stale"
    )


async def test_every_spec_metric_is_exported_after_traffic(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await seed.tenant()
    await seed.grant(f"workspace:{tenant.workspace}")
    assert_allowed(await request(http, stack.proxy.data_url, key=tenant.key, model=SOL))
    names = {name for name, _, _ in await metric_samples(http, stack.proxy.admin_url)}
    for name in (
        "access_proxy_requests_total",
        "access_proxy_request_duration_seconds_bucket",
        "access_proxy_decision_duration_seconds_bucket",
        "access_proxy_upstream_ttfb_seconds_bucket",
        "access_proxy_inflight_requests",
        "access_proxy_cache_lookups_total",
        "access_proxy_cache_invalidations_total",
        "access_proxy_config_reloads_total",
        "access_proxy_config_info",
    ):
        assert name in names, name
