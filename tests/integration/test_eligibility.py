"""Eligibility (SPEC §4): a program that requires an account representative refuses grant
requests for orgs without one and for their workspaces (422 ``not_eligible``); the
representative is set and cleared through the admin API and the CLI, audited; a grant outlives a
representative cleared later, and ``explain`` says so. Real Redis, the real admin app."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import config
from proxy.store.audit import read_entries, verify_chain
from tests.integration.conftest import (
    TOKENS,
    Admin,
    assert_error,
    config_text,
    start_admin,
)

PREVIEW = "gpt-5.6-preview"
ALPHA = "gpt-5.5-alpha"


def eligibility_config(upstream_url: str = "http://127.0.0.1:9") -> config.Config:
    """The admin tests' config with the preview (only) requiring an account representative."""
    text = config_text(upstream_url).replace(
        "    phases: {api: preview, codex: preview, chatgpt: closed}\n",
        "    phases: {api: preview, codex: preview, chatgpt: closed}\n"
        "    eligibility: {requires_account_representative: true}\n",
    )
    cfg = config.parse(text)
    assert cfg.programs[PREVIEW].eligibility.requires_account_representative
    assert not cfg.programs[ALPHA].eligibility.requires_account_representative
    return cfg


@pytest.fixture
async def admin(redis_client: redis.asyncio.Redis) -> AsyncIterator[Admin]:
    api, runner = await start_admin(redis_client)
    api.holder.swap(eligibility_config())
    try:
        yield api
    finally:
        await api.session.close()
        await runner.cleanup()


async def _org(admin: Admin, org_id: str, rep: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": org_id}
    if rep is not None:
        body["account_representative"] = rep
    data: dict[str, Any] = await admin.ok("ops", "POST", "/admin/v1/orgs", body, 201)
    return data


async def _request(admin: Admin, subject: str, program: str = PREVIEW) -> tuple[int, Any]:
    body = {"program": program, "product": "api", "subject": subject}
    return await admin.call("ops", "POST", "/admin/v1/grants", body)


async def test_org_without_representative_and_its_workspaces_are_not_eligible(
    admin: Admin,
) -> None:
    await _org(admin, "hooli")
    await admin.workspace("hooli-lab", "hooli")
    for subject in ("org:hooli", "workspace:hooli-lab"):
        status, data = await _request(admin, subject)
        assert status == 422, data
        assert_error(data, "not_eligible", "subject")
        assert "account representative" in data["error"]["message"]
    # A program without the requirement is unaffected.
    status, data = await _request(admin, "org:hooli", ALPHA)
    assert status == 201, data
    # Nothing was written for the refused requests.
    _, listed = await admin.call("dashboards", "GET", "/admin/v1/grants")
    assert [g["program"] for g in listed["grants"]] == [ALPHA]


async def test_representative_set_and_cleared_through_the_api_is_audited(admin: Admin) -> None:
    created = await _org(admin, "acme", "Dana Reyes")
    assert created["account_representative"] == "Dana Reyes"
    status, data = await _request(admin, "org:acme")
    assert status == 201, data

    await _org(admin, "globex")
    assert (await _request(admin, "org:globex"))[0] == 422
    patched = await admin.ok(
        "ops", "PATCH", "/admin/v1/orgs/globex", {"account_representative": "Sam"}
    )
    assert patched["account_representative"] == "Sam"
    assert (await admin.ok("dashboards", "GET", "/admin/v1/orgs/globex")) == patched
    assert (await _request(admin, "org:globex"))[0] == 201

    cleared = await admin.ok(
        "ops", "PATCH", "/admin/v1/orgs/globex", {"account_representative": None}
    )
    assert cleared["account_representative"] is None

    _, audit = await admin.call("dashboards", "GET", "/admin/v1/audit", params={"limit": "100"})
    rep_entries = [e for e in audit["entries"] if e["action"].startswith("org.account_rep")]
    assert [(e["action"], e["before"]["account_representative"]) for e in rep_entries] == [
        ("org.account_rep.set", None),
        ("org.account_rep.clear", "Sam"),
    ]
    assert rep_entries[1]["after"]["account_representative"] is None
    entries = await read_entries(admin.redis, 0, 10_000)
    assert verify_chain(entries) is None


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code", "param"),
    [
        ("PATCH", "/admin/v1/orgs/acme", {}, 422, "invalid_body", "account_representative"),
        ("PATCH", "/admin/v1/orgs/acme", {"account_representative": 7}, 422, "invalid_body", None),
        (
            "PATCH",
            "/admin/v1/orgs/acme",
            {"account_representative": " "},
            422,
            "invalid_body",
            None,
        ),
        ("PATCH", "/admin/v1/orgs/acme", {"name": "x"}, 422, "invalid_body", "name"),
        ("PATCH", "/admin/v1/orgs/nobody", {"account_representative": "x"}, 404, "not_found", None),
        ("POST", "/admin/v1/orgs", {"id": "o2", "account_representative": ["x"]}, 422, None, None),
        ("GET", "/admin/v1/orgs/nobody", None, 404, "not_found", None),
    ],
)
async def test_bad_representative_bodies_are_refused_and_change_nothing(
    admin: Admin,
    method: str,
    path: str,
    body: Any,
    status: int,
    code: str | None,
    param: str | None,
) -> None:
    await _org(admin, "acme", "Dana")
    got, data = await admin.call("ops", method, path, body)
    assert got == status, data
    if code is not None:
        assert_error(data, code, param)
    assert (await admin.ok("ops", "GET", "/admin/v1/orgs/acme"))["account_representative"] == "Dana"


async def test_only_operators_set_a_representative(admin: Admin) -> None:
    await _org(admin, "acme")
    for token in ("dashboards", "provider-review"):
        status, data = await admin.call(
            token, "PATCH", "/admin/v1/orgs/acme", {"account_representative": "Me"}
        )
        assert status == 403, data
    status, _ = await admin.call(None, "PATCH", "/admin/v1/orgs/acme", {})
    assert status == 401


async def test_a_grant_outlives_a_cleared_representative_and_explain_says_so(
    admin: Admin,
) -> None:
    await _org(admin, "acme", "Dana")
    await admin.workspace("acme-dev", "acme")
    grant = await admin.grant("org:acme")
    gid = grant["grant_id"]
    await admin.ok(
        "provider-review",
        "POST",
        f"/admin/v1/grants/{gid}/approve",
        {"role": "provider", "reviewer": "alice"},
    )
    await admin.ok(
        "gov-review",
        "POST",
        f"/admin/v1/grants/{gid}/approve",
        {"role": "government", "reviewer": "grace"},
    )
    await admin.ok("ops", "POST", f"/admin/v1/grants/{gid}/enable", {})
    params = {"workspace": "acme-dev", "product": "api", "model": "gpt-5.6-sol"}

    before = await admin.ok("dashboards", "GET", "/admin/v1/explain", params=params)
    assert before["allowed"], before
    assert before["facts"]["eligibility"] == {
        "requires_account_representative": True,
        "org_eligible": True,
    }

    await admin.ok("ops", "PATCH", "/admin/v1/orgs/acme", {"account_representative": None})
    after = await admin.ok("dashboards", "GET", "/admin/v1/explain", params=params)
    assert after["allowed"], after  # the existing grant stays in force
    eligibility = after["facts"]["eligibility"]
    assert eligibility["org_eligible"] is False
    assert "predates" in eligibility["note"]
    # ...but a new grant (another product) can no longer be requested.
    status, data = await admin.call(
        "ops",
        "POST",
        "/admin/v1/grants",
        {"program": PREVIEW, "product": "codex", "subject": "org:acme"},
    )
    assert status == 422 and data["error"]["code"] == "not_eligible", data


# One model of eligibility, checked against the real API over generated histories.
_ORGS = ("o1", "o2")
_op = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(_ORGS), st.sampled_from(["Dana", "Sam"])),
    st.tuples(st.just("clear"), st.sampled_from(_ORGS), st.none()),
    st.tuples(st.just("request"), st.sampled_from(_ORGS), st.sampled_from(["org", "workspace"])),
)
_run = itertools.count()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    initial=st.tuples(st.booleans(), st.booleans()),
    ops=st.lists(_op, min_size=1, max_size=8),
)
async def test_a_grant_request_succeeds_exactly_when_the_org_has_a_representative(
    admin: Admin, initial: tuple[bool, bool], ops: list[tuple[str, str, str | None]]
) -> None:
    run = next(_run)
    reps: dict[str, str | None] = {}
    for org, has_rep in zip(_ORGS, initial, strict=True):
        reps[org] = "Initial Rep" if has_rep else None
        await _org(admin, f"{org}-{run}", reps[org])
        await admin.workspace(f"{org}-{run}-ws", f"{org}-{run}")
    products = itertools.cycle(("api", "codex", "chatgpt"))
    for kind, org, arg in ops:
        org_id = f"{org}-{run}"
        if kind in ("set", "clear"):
            await admin.ok(
                "ops", "PATCH", f"/admin/v1/orgs/{org_id}", {"account_representative": arg}
            )
            reps[org] = arg
            continue
        subject = f"org:{org_id}" if arg == "org" else f"workspace:{org_id}-ws"
        status, data = await admin.call(
            "ops",
            "POST",
            "/admin/v1/grants",
            {"program": PREVIEW, "product": next(products), "subject": subject},
        )
        if reps[org] is None:
            assert status == 422 and data["error"]["code"] == "not_eligible", data
        else:
            assert status in (201, 409), data  # 409: this subject already holds that grant


async def test_a_clear_racing_a_request_never_leaves_an_ineligible_grant(admin: Admin) -> None:
    """The request reads the org inside its transaction: a grant is only written while the org
    had a representative, whatever the interleaving."""
    for i in range(20):
        org = f"race-{i}"
        await _org(admin, org, "Dana")
        clear = admin.call(
            "ops", "PATCH", f"/admin/v1/orgs/{org}", {"account_representative": None}
        )
        ask = _request(admin, f"org:{org}")
        (_, _), (status, data) = await asyncio.gather(clear, ask)
        assert status in (201, 422), data
        _, audit = await admin.call(
            "dashboards", "GET", "/admin/v1/audit", params={"limit": "1000"}
        )
        mine = [
            e["action"]
            for e in audit["entries"]
            if org in e["target"]
            or (e["action"] == "grant.create" and e["after"].get("subject") == f"org:{org}")
        ]
        if status == 201:
            assert mine.index("grant.create") < mine.index("org.account_rep.clear"), mine
        else:
            assert "grant.create" not in mine, mine


def _cli(admin: Admin, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ACCESS_PROXY_ADMIN_URL": admin.url,
        "ACCESS_PROXY_ADMIN_TOKEN": TOKENS["ops"][0],
    }
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "admin", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_cli_sets_and_clears_the_representative(admin: Admin) -> None:
    run = lambda *a: asyncio.to_thread(_cli, admin, *a)  # noqa: E731
    out = await run("orgs", "create", "acme", "--account-rep", "Dana Reyes")
    assert out.returncode == 0 and "Dana Reyes" in out.stdout, out
    out = await run("orgs", "create", "hooli")
    assert out.returncode == 0, out
    refused = await run(
        "grants", "request", "--program", PREVIEW, "--product", "api", "--subject", "org:hooli"
    )
    assert refused.returncode == 1 and "not_eligible" in refused.stderr + refused.stdout, refused
    out = await run("orgs", "set-account-rep", "hooli", "Sam Okafor")
    assert out.returncode == 0 and "Sam Okafor" in out.stdout, out
    granted = await run(
        "grants", "request", "--program", PREVIEW, "--product", "api", "--subject", "org:hooli"
    )
    assert granted.returncode == 0, granted
    out = await run("--json", "orgs", "clear-account-rep", "hooli")
    assert out.returncode == 0 and '"account_representative": null' in out.stdout, out
    shown = await run("orgs", "show", "hooli")
    assert shown.returncode == 0 and "hooli" in shown.stdout, shown
