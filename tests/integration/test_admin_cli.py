"""``access-proxy admin`` as a real subprocess (``python -m proxy.admin.cli``) against a live
admin API on loopback: every command, tables and ``--json``, flags and env, and failures."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from proxy.admin.client import TOKEN_ENV, URL_ENV
from tests.integration.conftest import REPO, Admin, run_cli


async def ok(admin: Admin, *args: str, **kw: Any) -> str:
    rc, out, err = await run_cli(admin, *args, **kw)
    assert rc == 0, (args, rc, out, err)
    return out


async def test_every_command_through_a_whole_lifecycle(admin: Admin) -> None:
    # Commands that do not depend on each other run concurrently to keep the test short.
    out, org_json = await asyncio.gather(
        ok(admin, "orgs", "create", "acme", "--name", "Acme Corp"),
        ok(admin, "--json", "orgs", "create", "globex"),
    )
    assert "created org" in out and "Acme Corp" in out
    assert json.loads(org_json) == {
        "id": "globex",
        "name": "",
        "suspended": False,
        "account_representative": None,
    }
    out = await ok(admin, "workspaces", "create", "acme-dev", "--org", "acme", via_env=True)
    assert "acme-dev" in out
    key_json, key_text, grant_json = await asyncio.gather(
        ok(admin, "keys", "issue", "acme-dev", "--name", "ci", "--json"),
        ok(admin, "keys", "issue", "acme-dev"),
        ok(
            admin,
            "grants",
            "request",
            "--program",
            "gpt-5.6-preview",
            "--product",
            "api",
            "--subject",
            "org:acme",
            "--model",
            "gpt-5.6-sol,gpt-5.6-terra",
            "--json",
        ),
    )
    key = json.loads(key_json)
    assert key["key"].startswith("sk-ap-")
    assert "shown only now" in key_text and "sk-ap-" in key_text
    grant = json.loads(grant_json)
    gid = grant["grant_id"]
    assert (grant["state"], grant["models"]) == ("requested", ["gpt-5.6-sol", "gpt-5.6-terra"])

    out = await ok(
        admin,
        "grants",
        "approve",
        gid,
        "--role",
        "provider",
        "--reviewer",
        "pat",
        token="provider-review",
    )
    assert "pending_review" in out and "pat" in out
    out = await ok(
        admin,
        "grants",
        "approve",
        gid,
        "--role",
        "government",
        "--reviewer",
        "gil",
        token="gov-review",
        via_env=True,
    )
    assert "approved" in out
    out = await ok(admin, "grants", "enable", gid, "--at", "2099-01-01T00:00:00Z")
    assert "2099-01-01T00:00:00Z" in out
    assert "enabled" in await ok(admin, "grants", "enable", gid)

    explain_args = ("explain", "--key-id", key["key_id"], "--product", "api")
    shown, listed, codex, alpha, allow, deny = await asyncio.gather(
        ok(admin, "grants", "show", gid, token="dashboards"),
        ok(admin, "grants", "list", "--subject", "org:acme", token="dashboards"),
        ok(admin, "grants", "list", "--product", "codex", "--json"),
        ok(admin, "grants", "list", "--program", "gpt-5.5-alpha"),
        ok(admin, *explain_args, "--model", "gpt-5.6-sol", token="dashboards"),
        ok(admin, *explain_args, "--model", "gpt-5.6-luna"),
    )
    state_line = next(line for line in shown.splitlines() if line.startswith("state"))
    assert state_line.split() == ["state", "enabled"]
    header, row = listed.splitlines()
    assert header.split()[:5] == ["GRANT_ID", "SUBJECT", "PROGRAM", "PRODUCT", "STATE"]
    assert row.split()[:5] == [gid, "org:acme", "gpt-5.6-preview", "api", "enabled"]
    assert json.loads(codex) == {"grants": []}
    assert "no grants" in alpha
    assert "decision  allow" in allow and "grant.enabled" in allow
    assert "deny 404 model_not_found" in deny and "grant.model_subset" in deny

    assert "suspended" in await ok(admin, "grants", "suspend", gid, "--reason", "review")
    explained = json.loads(
        await ok(admin, *explain_args, "--model", "gpt-5.6-sol", "--json", token="dashboards")
    )
    assert (explained["code"], explained["rule"]) == ("access_suspended", "grant.suspended")
    assert "enabled" in await ok(admin, "grants", "reinstate", gid, "--reason", "cleared")
    await ok(admin, "workspaces", "suspend", "acme-dev", "--reason", "billing")
    out = await ok(
        admin, "explain", "--workspace", "acme-dev", "--product", "api", "--model", "gpt-5.6-sol"
    )
    assert "deny 403 workspace_suspended" in out
    await ok(admin, "workspaces", "reinstate", "acme-dev", "--reason", "paid")
    await ok(admin, "orgs", "suspend", "acme", "--reason", "review")
    out = await ok(admin, "orgs", "reinstate", "acme", "--reason", "done")
    assert out.split("\n")[2].split() == ["suspended", "no"]
    revoked_grant, revoked_key = await asyncio.gather(
        ok(admin, "grants", "revoke", gid, "--reason", "ended"),
        ok(admin, "keys", "revoke", key["key_id"]),
    )
    assert "revoked" in revoked_grant
    assert f"revoked key {key['key_id']}" in revoked_key

    out, audit_json, verified = await asyncio.gather(
        ok(admin, "audit", "list", "--limit", "3", token="dashboards"),
        ok(admin, "audit", "list", "--after", "3", "--json"),
        ok(admin, "audit", "verify", token="dashboards"),
    )
    lines = out.splitlines()
    assert lines[0].split() == ["SEQ", "AT", "ACTOR", "ACTION", "TARGET", "REASON"]
    assert sorted(line.split()[3] for line in lines[1:]) == [
        "org.create",
        "org.create",
        "workspace.create",
    ]
    audit = json.loads(audit_json)
    assert audit["entries"][0]["seq"] == 4
    assert verified.strip() == f"audit chain ok: {audit['head']['seq']} entries"


async def test_failures_exit_non_zero_with_the_api_message(admin: Admin) -> None:
    await ok(admin, "orgs", "create", "acme")
    rc, out, err = await run_cli(
        admin,
        "grants",
        "request",
        "--program",
        "gpt-5.6-preview",
        "--product",
        "api",
        "--subject",
        "org:acme",
    )
    assert rc == 0
    gid = next(line.split()[1] for line in out.splitlines() if line.startswith("grant_id"))
    rc, out, err = await run_cli(
        admin,
        "grants",
        "request",
        "--program",
        "gpt-5.6-preview",
        "--product",
        "api",
        "--subject",
        "org:acme",
    )
    assert rc == 1 and out == ""
    assert "exists" in err and "HTTP 409" in err and f"existing grant: {gid}" in err

    cases: list[tuple[tuple[str, ...], dict[str, Any], int, str]] = [
        (("orgs", "create", "x"), {"token": None}, 2, f"set {TOKEN_ENV}"),
        (("orgs", "create", "x"), {"token": None, "via_env": True}, 2, "no admin token"),
        (("orgs", "create", "x"), {"token": "dashboards"}, 1, "HTTP 403"),
        (
            ("grants", "approve", gid, "--role", "provider", "--reviewer", "p"),
            {"token": "ops"},
            1,
            "lacks the approver role",
        ),
        (
            ("grants", "approve", gid, "--role", "provider", "--reviewer", "p"),
            {"token": "gov-review"},
            1,
            "may approve as government only",
        ),
        (
            (
                "grants",
                "request",
                "--program",
                "gpt-9",
                "--product",
                "api",
                "--subject",
                "org:acme",
            ),
            {},
            1,
            "unknown program 'gpt-9'",
        ),
        (
            (
                "grants",
                "request",
                "--program",
                "gpt-5.6-preview",
                "--product",
                "api",
                "--subject",
                "org:acme",
                "--expires-at",
                "next week",
            ),
            {},
            1,
            "expires_at must be an RFC 3339",
        ),
        (("grants", "show", "gr_missing"), {}, 1, "grant gr_missing not found (HTTP 404"),
        (("workspaces", "suspend", "acme-dev"), {}, 2, "--reason"),
        (("explain", "--product", "api"), {}, 2, "--key-id"),
    ]
    results = await asyncio.gather(*(run_cli(admin, *args, **kw) for args, kw, _, _ in cases))
    for (args, _, code, needle), (rc, out, err) in zip(cases, results, strict=True):
        assert rc == code, (args, rc, out, err)
        assert needle in err, (args, err)

    (rc, out, err), (rc2, out2, _) = await asyncio.gather(
        run_cli(admin, "orgs", "create", "y", "--token", "wrong", token=None),
        run_cli(admin, "--json", "orgs", "create", "acme"),
    )
    assert rc == 1 and "Missing or invalid admin token" in err and "HTTP 401" in err
    assert rc2 == 1 and json.loads(out2)["error"]["code"] == "conflict"

    env = {k: v for k, v in os.environ.items() if k not in (URL_ENV, TOKEN_ENV)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.admin.cli",
        "--url",
        "http://127.0.0.1:1",
        "--token",
        "t",
        "audit",
        "list",
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err_b = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1 and "cannot reach the admin API" in err_b.decode()
