"""The admin API (SPEC §7) on loopback over a real Redis: status codes and bodies, strict body
validation, token roles, the grant lifecycle and explain."""

from __future__ import annotations

import collections
import random
import time
from typing import Any

import pytest
import redis.asyncio

from proxy import config
from proxy.mock_upstream import MockUpstream
from tests.integration.conftest import (
    RFC3339_Z,
    TOKENS,
    Admin,
    assert_error,
    config_text,
    sha,
    start_admin,
    start_plane,
)

# --------------------------------------------------------------------------- auth and roles


async def test_missing_or_wrong_token_is_401_and_client_keys_never_reach_admin(
    admin: Admin,
) -> None:
    await admin.org("acme")
    await admin.workspace("acme-dev", "acme")
    client_key = (await admin.key("acme-dev"))["key"]
    attempts: list[dict[str, Any]] = [
        {"token": None},
        {"token": None, "raw_auth": "Bearer not-a-token"},
        {"token": None, "raw_auth": f"Basic {TOKENS['ops'][0]}"},
        {"token": None, "raw_auth": "Bearer "},
        {"token": None, "raw_auth": f"Bearer {client_key}"},
        {"token": None, "raw_auth": f"Bearer {sha(TOKENS['ops'][0])}"},  # the hash is no token
    ]
    for kw in attempts:
        for method, path in (
            ("GET", "/admin/v1/grants"),
            ("POST", "/admin/v1/orgs"),
            ("GET", "/admin/v1/audit"),
            ("GET", "/admin/v1/no-such-endpoint"),
        ):
            token = kw["token"]
            status, data = await admin.call(
                token, method, path, {"id": "evil"}, raw_auth=kw.get("raw_auth")
            )
            assert status == 401, (kw, path, status, data)
            assert_error(data, "unauthorized")
            assert data["error"]["type"] == "authentication_error"
    # Nothing was created by the refused calls.
    status, _ = await admin.call("ops", "POST", "/admin/v1/orgs", {"id": "evil"})
    assert status == 201
    for method, path in (("GET", "/admin/v1/no-such-endpoint"), ("GET", "/admin/v1/orgs")):
        status, data = await admin.call("ops", method, path)
        assert status == 404, (method, path, data)
        assert_error(data, "not_found")
    status, data = await admin.call(
        "ops", "POST", "/admin/v1/orgs", {"id": "big", "name": "x" * 2**21}
    )
    assert status == 422
    assert_error(data, "invalid_body")


async def test_tokens_without_the_role_get_403(admin: Admin) -> None:
    await admin.org("acme")
    grant = await admin.grant("org:acme")
    gid = grant["grant_id"]
    for token in ("dashboards", "provider-review", "gov-review"):
        for method, path, body in (
            ("POST", "/admin/v1/orgs", {"id": "x1"}),
            ("POST", "/admin/v1/workspaces", {"id": "w1", "org_id": "acme"}),
            (
                "POST",
                "/admin/v1/grants",
                {"program": "gpt-5.6-preview", "product": "api", "subject": "org:acme"},
            ),
            ("POST", f"/admin/v1/grants/{gid}/enable", {}),
            ("POST", f"/admin/v1/grants/{gid}/revoke", {"reason": "r"}),
            ("POST", "/admin/v1/orgs/acme/suspend", {"reason": "r"}),
            ("DELETE", "/admin/v1/keys/abcdef012345", None),
        ):
            status, data = await admin.call(token, method, path, body)
            assert status == 403, (token, path, status, data)
            assert_error(data, "forbidden")
            assert data["error"]["type"] == "permission_error"
    # Operators and viewers cannot approve; an approver cannot approve for another role.
    for token, role in (
        ("ops", "provider"),
        ("dashboards", "provider"),
        ("gov-review", "provider"),
        ("provider-review", "government"),
    ):
        status, data = await admin.call(
            token, "POST", f"/admin/v1/grants/{gid}/approve", {"role": role, "reviewer": "r"}
        )
        assert status == 403, (token, role, status, data)
        assert_error(data, "forbidden")
    assert (await admin.ok("dashboards", "GET", f"/admin/v1/grants/{gid}"))["approvals"] == []
    # Every token may read.
    for token in TOKENS:
        await admin.ok(token, "GET", f"/admin/v1/grants/{gid}")
        await admin.ok(token, "GET", "/admin/v1/audit")


def test_admin_listener_binds_loopback_by_default() -> None:
    cfg = config.parse(config_text())
    assert cfg.admin.listen.host == "127.0.0.1"


# --------------------------------------------------------------------------- orgs, workspaces, keys


async def test_orgs_and_workspaces(admin: Admin) -> None:
    org = await admin.ok("ops", "POST", "/admin/v1/orgs", {"id": "acme", "name": "Acme"}, 201)
    assert org == {
        "id": "acme",
        "name": "Acme",
        "suspended": False,
        "account_representative": None,
    }
    status, data = await admin.call("ops", "POST", "/admin/v1/orgs", {"id": "acme"})
    assert status == 409
    assert_error(data, "conflict")
    ws = await admin.ok(
        "ops", "POST", "/admin/v1/workspaces", {"id": "acme-dev", "org_id": "acme"}, 201
    )
    assert ws == {"id": "acme-dev", "org_id": "acme", "name": "", "suspended": False}
    status, data = await admin.call(
        "ops", "POST", "/admin/v1/workspaces", {"id": "acme-dev", "org_id": "acme"}
    )
    assert status == 409

    invalid: list[tuple[str, Any, str | None]] = [
        ("/admin/v1/workspaces", {"id": "w2", "org_id": "nope"}, "org_id"),
        ("/admin/v1/workspaces", {"id": "w2"}, "org_id"),
        ("/admin/v1/workspaces", {"id": "w2", "org_id": "acme", "color": "red"}, "color"),
        ("/admin/v1/orgs", {"id": 5}, "id"),
        ("/admin/v1/orgs", {"id": "has space"}, "id"),
        ("/admin/v1/orgs", {"id": "a:b"}, "id"),
        ("/admin/v1/orgs", {"id": "ok", "name": ["x"]}, "name"),
        ("/admin/v1/orgs", {}, "id"),
        ("/admin/v1/orgs", ["acme"], None),
        ("/admin/v1/orgs/acme/suspend", {}, "reason"),
        ("/admin/v1/orgs/acme/suspend", {"reason": ""}, "reason"),
        ("/admin/v1/workspaces/acme-dev/suspend", {"reason": 3}, "reason"),
    ]
    for path, body, param in invalid:
        status, data = await admin.call("ops", "POST", path, body)
        assert status == 422, (path, body, status, data)
        assert_error(data, "invalid_body", param)
    async with admin.session.post(
        admin.url + "/admin/v1/orgs",
        data=b"{not json",
        headers={"authorization": f"Bearer {TOKENS['ops'][0]}"},
    ) as resp:
        assert resp.status == 422
        assert_error(await resp.json(), "invalid_body")

    suspended = await admin.ok("ops", "POST", "/admin/v1/orgs/acme/suspend", {"reason": "audit"})
    assert suspended["suspended"] is True
    back = await admin.ok("ops", "POST", "/admin/v1/orgs/acme/reinstate", {"reason": "ok"})
    assert back["suspended"] is False
    ws = await admin.ok("ops", "POST", "/admin/v1/workspaces/acme-dev/suspend", {"reason": "r"})
    assert ws["suspended"] is True
    ws = await admin.ok("ops", "POST", "/admin/v1/workspaces/acme-dev/reinstate", {"reason": "r"})
    assert ws["suspended"] is False
    for path in ("/admin/v1/orgs/nope/suspend", "/admin/v1/workspaces/nope/reinstate"):
        status, data = await admin.call("ops", "POST", path, {"reason": "r"})
        assert status == 404
        assert_error(data, "not_found")


async def test_keys_issue_once_and_revoke(admin: Admin) -> None:
    await admin.org("acme")
    await admin.workspace("acme-dev", "acme")
    issued = await admin.key("acme-dev")
    assert set(issued) == {"key_id", "key", "workspace_id", "name"}
    assert issued["key"].startswith("sk-ap-" + issued["key_id"] + "-")
    assert len(issued["key"]) >= len("sk-ap-") + 12 + 1 + 32  # well over 128 random bits
    other = await admin.key("acme-dev")
    assert other["key_id"] != issued["key_id"] and other["key"] != issued["key"]

    status, data = await admin.call("ops", "POST", "/admin/v1/workspaces/nope/keys", {})
    assert status == 404
    assert_error(data, "not_found")
    status, data = await admin.call(
        "ops", "POST", "/admin/v1/workspaces/acme-dev/keys", {"name": "x", "scope": "all"}
    )
    assert status == 422
    assert_error(data, "invalid_body", "scope")

    status, data = await admin.call("ops", "DELETE", f"/admin/v1/keys/{issued['key_id']}")
    assert (status, data) == (204, None)
    status, data = await admin.call("ops", "DELETE", "/admin/v1/keys/000000000000")
    assert status == 404
    assert_error(data, "not_found")
    explained = await admin.ok(
        "dashboards",
        "GET",
        "/admin/v1/explain",
        params={"key_id": issued["key_id"], "product": "api", "model": "gpt-5.6-sol"},
    )
    assert (explained["code"], explained["rule"]) == ("invalid_api_key", "key.revoked")
    assert explained["status"] == 401


# --------------------------------------------------------------------------- grants


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"program": "gpt-9", "product": "api", "subject": "org:acme"}, "program"),
        ({"program": 7, "product": "api", "subject": "org:acme"}, "program"),
        ({"program": "gpt-5.6-preview", "product": "sora", "subject": "org:acme"}, "product"),
        ({"program": "gpt-5.6-preview", "subject": "org:acme"}, "product"),
        ({"program": "gpt-5.6-preview", "product": "api", "subject": "acme"}, "subject"),
        ({"program": "gpt-5.6-preview", "product": "api", "subject": "org:"}, "subject"),
        ({"program": "gpt-5.6-preview", "product": "api", "subject": "team:acme"}, "subject"),
        ({"program": "gpt-5.6-preview", "product": "api", "subject": "org:nope"}, "subject"),
        ({"program": "gpt-5.6-preview", "product": "api", "subject": "workspace:acme"}, "subject"),
        ({"program": "gpt-5.6-preview", "product": "api", "subject": ["org:acme"]}, "subject"),
        (
            {
                "program": "gpt-5.6-preview",
                "product": "api",
                "subject": "org:acme",
                "models": ["gpt-5.5-alpha"],
            },
            "models",
        ),
        (
            {
                "program": "gpt-5.6-preview",
                "product": "api",
                "subject": "org:acme",
                "models": "gpt-5.6-sol",
            },
            "models",
        ),
        (
            {"program": "gpt-5.6-preview", "product": "api", "subject": "org:acme", "models": []},
            "models",
        ),
        (
            {
                "program": "gpt-5.6-preview",
                "product": "api",
                "subject": "org:acme",
                "expires_at": "tomorrow",
            },
            "expires_at",
        ),
        (
            {
                "program": "gpt-5.6-preview",
                "product": "api",
                "subject": "org:acme",
                "expires_at": "2030-01-01",
            },
            "expires_at",
        ),
        (
            {
                "program": "gpt-5.6-preview",
                "product": "api",
                "subject": "org:acme",
                "expires_at": "2030-01-01T10:00:00",
            },
            "expires_at",
        ),
        (
            {
                "program": "gpt-5.6-preview",
                "product": "api",
                "subject": "org:acme",
                "expires_at": "2030-02-30T10:00:00Z",
            },
            "expires_at",
        ),
        (
            {
                "program": "gpt-5.6-preview",
                "product": "api",
                "subject": "org:acme",
                "expires_at": 1900000000,
            },
            "expires_at",
        ),
        (
            {
                "program": "gpt-5.6-preview",
                "product": "api",
                "subject": "org:acme",
                "state": "enabled",
            },
            "state",
        ),
    ],
)
async def test_invalid_grant_requests_name_the_field(
    admin: Admin, body: dict[str, Any], param: str
) -> None:
    await admin.org("acme")
    status, data = await admin.call("ops", "POST", "/admin/v1/grants", body)
    assert status == 422, data
    assert_error(data, "invalid_body", param)
    assert (await admin.ok("ops", "GET", "/admin/v1/grants"))["grants"] == []


async def test_grant_lifecycle(admin: Admin) -> None:
    await admin.org("acme")
    await admin.workspace("acme-dev", "acme")
    grant = await admin.grant(
        "workspace:acme-dev", models=["gpt-5.6-sol"], expires_at="2099-01-01T00:00:00+02:00"
    )
    gid = grant["grant_id"]
    assert grant["state"] == "requested"
    assert grant["missing_approvals"] == ["provider", "government"]
    assert grant["models"] == ["gpt-5.6-sol"]
    assert grant["expires_at"] == "2098-12-31T22:00:00Z"
    assert RFC3339_Z.fullmatch(grant["created_at"])
    assert grant["enable_at"] is None

    status, data = await admin.call(
        "ops",
        "POST",
        "/admin/v1/grants",
        {"program": "gpt-5.6-preview", "product": "api", "subject": "workspace:acme-dev"},
    )
    assert status == 409
    assert_error(data, "conflict")
    assert data["grant_id"] == gid
    # The same program on another product, or another program, is another grant.
    await admin.grant("workspace:acme-dev", product="codex")
    await admin.grant("workspace:acme-dev", program="gpt-5.5-alpha")

    approve = f"/admin/v1/grants/{gid}/approve"
    g = await admin.ok("provider-review", "POST", approve, {"role": "provider", "reviewer": "pat"})
    assert g["state"] == "pending_review"
    assert g["missing_approvals"] == ["government"]
    assert [(a["role"], a["reviewer"]) for a in g["approvals"]] == [("provider", "pat")]
    assert RFC3339_Z.fullmatch(g["approvals"][0]["at"])
    # The same reviewer cannot sign a second role; a role is recorded once.
    status, data = await admin.call(
        "gov-review", "POST", approve, {"role": "government", "reviewer": "pat"}
    )
    assert status == 409, data
    assert_error(data, "conflict")
    status, data = await admin.call(
        "provider-review", "POST", approve, {"role": "provider", "reviewer": "sam"}
    )
    assert status == 409, data
    status, data = await admin.call("gov-review", "POST", approve, {"role": "government"})
    assert status == 422
    assert_error(data, "invalid_body", "reviewer")
    g = await admin.ok("gov-review", "POST", approve, {"role": "government", "reviewer": "gil"})
    assert g["state"] == "approved" and g["missing_approvals"] == []

    enable = f"/admin/v1/grants/{gid}/enable"
    g = await admin.ok("ops", "POST", enable, {"at": "2098-06-01T00:00:00Z"})
    assert (g["state"], g["enable_at"]) == ("approved", "2098-06-01T00:00:00Z")
    status, data = await admin.call("ops", "POST", enable, {"at": "soon"})
    assert status == 422
    assert_error(data, "invalid_body", "at")
    before = time.time()
    g = await admin.ok("ops", "POST", enable)
    assert g["state"] == "enabled"
    g = await admin.ok("ops", "POST", f"/admin/v1/grants/{gid}/suspend", {"reason": "review"})
    assert g["state"] == "suspended"
    g = await admin.ok("ops", "POST", f"/admin/v1/grants/{gid}/reinstate", {"reason": "ok"})
    assert g["state"] == "enabled"
    shown = await admin.ok("dashboards", "GET", f"/admin/v1/grants/{gid}")
    assert shown == g
    assert time.time() - before < 60

    listed = await admin.ok(
        "dashboards", "GET", "/admin/v1/grants", params={"subject": "workspace:acme-dev"}
    )
    assert len(listed["grants"]) == 3
    listed = await admin.ok(
        "dashboards",
        "GET",
        "/admin/v1/grants",
        params={"subject": "workspace:acme-dev", "program": "gpt-5.6-preview", "product": "api"},
    )
    assert [x["grant_id"] for x in listed["grants"]] == [gid]
    listed = await admin.ok("dashboards", "GET", "/admin/v1/grants", params={"product": "codex"})
    assert [x["product"] for x in listed["grants"]] == ["codex"]
    for params, param in (({"subject": "acme"}, "subject"), ({"owner": "x"}, "owner")):
        status, data = await admin.call("dashboards", "GET", "/admin/v1/grants", params=params)
        assert status == 422
        assert_error(data, "invalid_body", param)

    g = await admin.ok("ops", "POST", f"/admin/v1/grants/{gid}/revoke", {"reason": "misuse"})
    assert g["state"] == "revoked"
    for action in ("suspend", "reinstate", "revoke"):
        status, data = await admin.call(
            "ops", "POST", f"/admin/v1/grants/{gid}/{action}", {"reason": "again"}
        )
        assert status == 409, (action, data)
    status, _ = await admin.call("ops", "POST", f"/admin/v1/grants/{gid}/enable", {})
    assert status == 409
    # Revocation is final: a new grant must be requested, and it starts from nothing.
    fresh = await admin.grant("workspace:acme-dev")
    assert fresh["grant_id"] != gid and fresh["state"] == "requested"

    for method, path in (
        ("GET", "/admin/v1/grants/gr_nope"),
        ("POST", "/admin/v1/grants/gr_nope/enable"),
        ("POST", "/admin/v1/grants/gr_nope/suspend"),
    ):
        status, data = await admin.call(
            "ops", method, path, {"reason": "x"} if "sus" in path else None
        )
        assert status == 404, (path, data)
        assert_error(data, "not_found")
    status, data = await admin.call(
        "provider-review",
        "POST",
        "/admin/v1/grants/gr_nope/approve",
        {"role": "provider", "reviewer": "pat"},
    )
    assert status == 404


async def test_approval_role_must_be_required_by_the_program(admin: Admin) -> None:
    await admin.org("acme")
    gid = (await admin.grant("org:acme", program="gpt-5.5-alpha"))["grant_id"]
    status, data = await admin.call(
        "both-review",
        "POST",
        f"/admin/v1/grants/{gid}/approve",
        {"role": "government", "reviewer": "gil"},
    )
    assert status == 422
    assert_error(data, "invalid_body", "role")
    g = await admin.ok(
        "both-review",
        "POST",
        f"/admin/v1/grants/{gid}/approve",
        {"role": "provider", "reviewer": "pat"},
    )
    assert g["state"] == "approved"


async def test_one_token_cannot_sign_two_roles_under_two_names(admin: Admin) -> None:
    await admin.org("acme")
    gid = (await admin.grant("org:acme"))["grant_id"]
    path = f"/admin/v1/grants/{gid}/approve"
    await admin.ok("both-review", "POST", path, {"role": "provider", "reviewer": "pat"})
    status, data = await admin.call(
        "both-review", "POST", path, {"role": "government", "reviewer": "someone-else"}
    )
    assert status == 409
    assert_error(data, "conflict")
    g = await admin.ok(
        "gov-review", "POST", path, {"role": "government", "reviewer": "someone-else"}
    )
    assert g["state"] == "approved"


# --------------------------------------------------------------------------- explain


async def test_explain_names_the_rule_and_the_facts(admin: Admin) -> None:
    await admin.org("acme")
    await admin.workspace("acme-dev", "acme")
    await admin.workspace("acme-prod", "acme")
    key = await admin.key("acme-dev")
    gid = (await admin.grant("org:acme"))["grant_id"]
    await admin.ok(
        "provider-review",
        "POST",
        f"/admin/v1/grants/{gid}/approve",
        {"role": "provider", "reviewer": "pat"},
    )

    async def explain(**params: str) -> dict[str, Any]:
        data: dict[str, Any] = await admin.ok(
            "dashboards", "GET", "/admin/v1/explain", params=params
        )
        return data

    e = await explain(key_id=key["key_id"], product="api", model="gpt-5.6-sol")
    assert (e["allowed"], e["status"], e["code"]) == (False, 403, "access_pending_review")
    assert e["rule"] == "grant.pending_review"
    assert e["facts"]["deciding_grant"] == "org"
    assert e["facts"]["grants"]["org"]["missing_approvals"] == ["government"]
    assert e["facts"]["grants"]["org"]["approvals"][0]["role"] == "provider"
    assert e["facts"]["phase"] == "preview" and e["facts"]["program"] == "gpt-5.6-preview"
    assert e["facts"]["key"] == {
        "key_id": key["key_id"],
        "workspace_id": "acme-dev",
        "revoked": False,
    }
    assert e["request"]["workspace"] is None and e["facts"]["workspace"]["id"] == "acme-dev"

    await admin.ok(
        "gov-review",
        "POST",
        f"/admin/v1/grants/{gid}/approve",
        {"role": "government", "reviewer": "gil"},
    )
    e = await explain(workspace="acme-prod", product="api", model="gpt-5.6-sol")
    assert (e["code"], e["rule"]) == ("access_not_yet_enabled", "grant.not_yet_enabled")
    assert e["facts"]["grants"]["org"]["enable_at"] is None
    await admin.ok("ops", "POST", f"/admin/v1/grants/{gid}/enable", {})
    e = await explain(workspace="acme-prod", product="api", model="gpt-5.6-terra")
    assert (e["allowed"], e["status"], e["code"], e["rule"]) == (True, 200, None, "grant.enabled")
    assert e["rate_limit"]["requests_per_minute"] > 0
    assert e["rate_limit"]["tokens_per_minute"] is None  # the shipped config sets no token limit
    assert "rate_limit" in e["not_evaluated"]

    # A workspace grant decides over the org grant, whatever its state.
    wgid = (await admin.grant("workspace:acme-prod"))["grant_id"]
    await admin.ok("ops", "POST", f"/admin/v1/grants/{wgid}/revoke", {"reason": "cut off"})
    e = await explain(workspace="acme-prod", product="api", model="gpt-5.6-sol")
    assert (e["status"], e["code"], e["rule"]) == (404, "model_not_found", "grant.revoked")
    assert e["facts"]["deciding_grant"] == "workspace"
    assert e["facts"]["grants"]["org"]["state"] == "enabled"

    e = await explain(workspace="acme-dev", product="chatgpt", model="gpt-5.6-sol")
    assert (e["code"], e["rule"], e["facts"]["phase"]) == (
        "product_unavailable",
        "phase.closed",
        "closed",
    )
    e = await explain(workspace="acme-dev", product="codex", model="gpt-5.5-alpha")
    assert (e["allowed"], e["rule"]) == (True, "phase.ga")
    e = await explain(workspace="acme-dev", product="api", model="some-other-model")
    assert (e["allowed"], e["rule"], e["facts"]["model_listed"]) == (True, "model.unlisted", False)
    await admin.ok("ops", "POST", "/admin/v1/orgs/acme/suspend", {"reason": "r"})
    e = await explain(workspace="acme-dev", product="api", model="gpt-5.6-sol")
    assert (e["status"], e["code"], e["rule"]) == (403, "workspace_suspended", "org.suspended")

    for params, status, code, param in (
        ({"workspace": "nope", "product": "api"}, 404, "not_found", None),
        ({"key_id": "000000000000", "product": "api"}, 404, "not_found", None),
        ({"product": "api", "model": "gpt-5.6-sol"}, 422, "invalid_body", "key_id"),
        (
            {"workspace": "acme-dev", "key_id": key["key_id"], "product": "api"},
            422,
            "invalid_body",
            "key_id",
        ),
        ({"workspace": "acme-dev", "product": "sora"}, 422, "invalid_body", "product"),
        ({"workspace": "acme-dev"}, 422, "invalid_body", "product"),
    ):
        got, data = await admin.call("dashboards", "GET", "/admin/v1/explain", params=params)
        assert got == status, (params, data)
        assert_error(data, code, param)


# --------------------------------------------------------------------------- explain = data plane

PREFIXES = {"api": "/v1", "codex": "/codex/v1", "chatgpt": "/chatgpt/v1"}
MODELS = ("gpt-5.6-sol", "gpt-5.6-luna", "gpt-5.6-terra", "gpt-5.5-alpha", "house-model-1")
HOUR = 3600.0
APPROVER_TOKENS = {"provider": "provider-review", "government": "gov-review"}


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


async def _random_grant(
    admin: Admin, rng: random.Random, subject: str, program: str, product: str
) -> None:
    extra: dict[str, Any] = {}
    if rng.random() < 0.3:
        models = config.parse(config_text()).programs[program].models
        extra["models"] = rng.sample(models, rng.randint(1, len(models)))
    if rng.random() < 0.3:
        extra["expires_at"] = _rfc3339(time.time() + rng.choice((-HOUR, HOUR)))
    gid = (await admin.grant(subject, program, product, **extra))["grant_id"]
    base = f"/admin/v1/grants/{gid}"
    required = admin.cfg.programs[program].required_approvals
    both_used = False  # a token may sign one role of a grant only
    for role in required:
        if rng.random() < 0.75:
            token = APPROVER_TOKENS[role]
            if not both_used and rng.random() < 0.5:
                token, both_used = "both-review", True
            await admin.ok(
                token, "POST", f"{base}/approve", {"role": role, "reviewer": f"{role}-person"}
            )
    if rng.random() < 0.7:
        at = time.time() + rng.choice((-HOUR, HOUR, -HOUR))
        await admin.ok("ops", "POST", f"{base}/enable", {"at": _rfc3339(at)})
    if rng.random() < 0.2:
        await admin.ok("ops", "POST", f"{base}/suspend", {"reason": "review"})
    if rng.random() < 0.15:
        await admin.ok("ops", "POST", f"{base}/revoke", {"reason": "done"})


WANTED_RULES = (
    "key.revoked",
    "workspace.suspended",
    "org.suspended",
    "phase.closed",
    "phase.ga",
    "model.unlisted",
    "grant.none",
    "grant.revoked",
    "grant.model_subset",
    "grant.pending_review",
    "grant.not_yet_enabled",
    "grant.suspended",
    "grant.expired",
    "grant.enabled",
)


async def test_explain_agrees_with_the_data_plane(
    redis_url: str, redis_client: redis.asyncio.Redis
) -> None:
    upstream = MockUpstream()
    await upstream.start()
    admin, admin_runner = await start_admin(redis_client, upstream.url)
    plane = await start_plane(redis_url, admin.holder)
    session, plane_url, cfg = plane.session, plane.url, admin.cfg
    rng = random.Random(20250601)
    seen: collections.Counter[str] = collections.Counter()
    try:
        for case in range(160):
            if case >= 40 and all(seen[rule] for rule in WANTED_RULES):
                break
            org, ws = f"o{case}", f"w{case}"
            await admin.org(org)
            await admin.workspace(ws, org)
            key = await admin.key(ws)
            granted: list[tuple[str, str]] = []
            for subject in (f"workspace:{ws}", f"org:{org}"):
                for program, product in (
                    ("gpt-5.6-preview", "api"),
                    ("gpt-5.6-preview", "codex"),
                    ("gpt-5.5-alpha", "api"),
                ):
                    if rng.random() < 0.5:
                        await _random_grant(admin, rng, subject, program, product)
                        granted.append((program, product))
            if rng.random() < 0.08:
                await admin.ok("ops", "POST", f"/admin/v1/workspaces/{ws}/suspend", {"reason": "r"})
            if rng.random() < 0.08:
                await admin.ok("ops", "POST", f"/admin/v1/orgs/{org}/suspend", {"reason": "r"})
            if rng.random() < 0.1:
                await admin.ok("ops", "DELETE", f"/admin/v1/keys/{key['key_id']}", status=204)
            for _ in range(3):
                # Mostly ask about a program and product that has a grant, so the deeper rows
                # of the decision are reached.
                if granted and rng.random() < 0.7:
                    program, product = rng.choice(granted)
                    model = rng.choice(cfg.programs[program].models)
                else:
                    product = rng.choice(("api", "codex", "chatgpt"))
                    model = rng.choice(MODELS)
                explained = await admin.ok(
                    "dashboards",
                    "GET",
                    "/admin/v1/explain",
                    params={"key_id": key["key_id"], "product": product, "model": model},
                )
                async with session.post(
                    plane_url + PREFIXES[product] + "/chat/completions",
                    json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                    headers={"authorization": f"Bearer {key['key']}"},
                ) as resp:
                    body = await resp.json()
                    got_code = None if resp.status == 200 else body["error"]["code"]
                    context = (case, product, model, explained["rule"], explained["facts"])
                    assert got_code == explained["code"], context
                    assert resp.status == explained["status"], context
                seen[explained["rule"]] += 1
    finally:
        await plane.close()
        await admin.session.close()
        await admin_runner.cleanup()
        await upstream.stop()
    # The random cases reached the interesting rules, so the agreement means something.
    for rule in WANTED_RULES:
        assert seen[rule] > 0, (rule, seen)
