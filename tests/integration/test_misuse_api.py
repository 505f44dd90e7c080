"""The misuse endpoints of the admin API (SPEC §6, §7) on loopback over a real Redis: flags,
standing, clear, reinstate and config reload: strict validation, token roles, the tier ladder
with its audit entries and metrics, and the same operations through the ``access-proxy admin``
CLI as a subprocess."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from aiohttp import web
from prometheus_client import REGISTRY

from proxy import config
from proxy.admin.api import AdminContext, admin_app
from proxy.identity import parse_peppers
from proxy.reload import Reloader
from proxy.snapshot import Holder
from proxy.store.writes import Writes
from tests.integration.conftest import (
    PEPPER,
    RFC3339_Z,
    Admin,
    assert_error,
    config_text,
    run_cli,
    start_admin,
)

FLAGS = "/admin/v1/workspaces/{}/flags"
STANDING = "/admin/v1/workspaces/{}/standing"


@pytest.fixture
async def admin(redis_client: redis.asyncio.Redis) -> AsyncIterator[Admin]:
    api, runner = await start_admin(redis_client)
    try:
        await api.org("acme")
        await api.workspace("acme-dev", "acme")
        yield api
    finally:
        await api.session.close()
        await runner.cleanup()


@pytest.fixture
async def reloading_admin(
    redis_client: redis.asyncio.Redis, tmp_path: Path
) -> AsyncIterator[tuple[Admin, Path]]:
    """An admin API whose reload is a real ``Reloader`` on a config file in ``tmp_path``."""
    path = tmp_path / "proxy.yaml"
    path.write_text(config_text())
    holder = Holder(config.load(str(path)))
    reloader = Reloader(holder, str(path))
    ctx = AdminContext(holder, Writes(redis_client), parse_peppers(PEPPER), reloader.admin_reload)
    runner = web.AppRunner(admin_app(ctx), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    session = aiohttp.ClientSession()
    api = Admin(
        f"http://127.0.0.1:{runner.addresses[0][1]}",
        session,
        redis_client,
        holder.current.config,
        holder,
    )
    try:
        yield api, path
    finally:
        await session.close()
        await runner.cleanup()


def flag(category: Any = "cyber", severity: Any = 1, source: Any = "analyst", **extra: Any) -> Any:
    return {"category": category, "severity": severity, "source": source, **extra}


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --------------------------------------------------------------------------- validation and roles


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"severity": 1, "source": "analyst"}, "category"),
        ({"category": "cyber", "source": "analyst"}, "severity"),
        ({"category": "cyber", "severity": 1}, "source"),
        (flag(extra_field=1), "extra_field"),
        (flag(category="Cyber Attack"), "category"),
        (flag(category=7), "category"),
        (flag(category="x" * 65), "category"),
        (flag(severity=0), "severity"),
        (flag(severity=101), "severity"),
        (flag(severity="2"), "severity"),
        (flag(severity=2.5), "severity"),
        (flag(severity=True), "severity"),
        (flag(source="two words"), "source"),
        (flag(source="upstream"), "source"),
        (flag(note=""), "note"),
        (flag(note=["a"]), "note"),
    ],
)
async def test_flag_bodies_are_validated_strictly(admin: Admin, body: Any, param: str) -> None:
    status, data = await admin.call("ops", "POST", FLAGS.format("acme-dev"), body)
    assert status == 422, (status, data)
    assert_error(data, "invalid_body", param)
    standing = await admin.ok("dashboards", "GET", STANDING.format("acme-dev"))
    assert standing["flags"] == [] and standing["score"] == 0


async def test_bodies_that_are_not_objects_and_unknown_workspaces(admin: Admin) -> None:
    async with admin.session.post(
        admin.url + FLAGS.format("acme-dev"),
        data=b"{not json",
        headers={"authorization": "Bearer ops-token-0123456789abcdef"},
    ) as resp:
        assert resp.status == 422
        assert_error(await resp.json(), "invalid_body")
    status, data = await admin.call("ops", "POST", FLAGS.format("acme-dev"), [flag()])
    assert status == 422
    assert_error(data, "invalid_body")
    for method, path, body in (
        ("POST", FLAGS.format("nope"), flag()),
        ("GET", STANDING.format("nope"), None),
        ("POST", STANDING.format("nope") + "/clear", {"reason": "r"}),
    ):
        status, data = await admin.call("ops", method, path, body)
        assert status == 404, (path, status, data)
        assert_error(data, "not_found")
    status, data = await admin.call("ops", "POST", STANDING.format("acme-dev") + "/clear", {})
    assert status == 422
    assert_error(data, "invalid_body", "reason")


async def test_roles(admin: Admin) -> None:
    for token in ("dashboards", "provider-review"):
        for path, body in (
            (FLAGS.format("acme-dev"), flag()),
            (STANDING.format("acme-dev") + "/clear", {"reason": "r"}),
            ("/admin/v1/config/reload", None),
        ):
            status, data = await admin.call(token, "POST", path, body)
            assert status == 403, (token, path, status, data)
            assert_error(data, "forbidden")
        standing = await admin.ok(token, "GET", STANDING.format("acme-dev"))
        assert standing["tier"] == "normal"
    for method, path in (("GET", STANDING.format("acme-dev")), ("POST", FLAGS.format("acme-dev"))):
        status, data = await admin.call(None, method, path, flag())
        assert status == 401
        assert_error(data, "unauthorized")
    # Nothing was recorded by the refused calls.
    standing = await admin.ok("ops", "GET", STANDING.format("acme-dev"))
    assert standing["flags"] == []


# --------------------------------------------------------------------------- the ladder


async def test_the_ladder_through_the_api_with_audit_and_metrics(admin: Admin) -> None:
    ws = "acme-dev"
    transitions = {
        t: sample("access_proxy_tier_transitions_total", tier=t)
        for t in ("watch", "restricted", "cooldown", "suspended", "normal")
    }
    flags_before = sample("access_proxy_misuse_flags_total", category="cyber", source="admin")

    ladder = [(1, 1, "watch"), (2, 3, "restricted"), (2, 5, "cooldown"), (3, 8, "suspended")]
    for severity, score, tier in ladder:
        data = await admin.ok(
            "ops", "POST", FLAGS.format(ws), flag(severity=severity, note=f"seen {tier}"), 201
        )
        assert (data["score"], data["tier"]) == (score, tier), data
        assert data["suspended"] is (tier == "suspended")
        if tier == "cooldown":
            assert RFC3339_Z.fullmatch(data["until"]), data
        last = data["flags"][-1]
        assert last["severity"] == severity and last["source"] == "analyst"
        assert last["note"] == f"seen {tier}"
        assert RFC3339_Z.fullmatch(last["at"]) and RFC3339_Z.fullmatch(last["expires_at"])
        assert sample("access_proxy_tier_transitions_total", tier=tier) == transitions[tier] + 1
    assert len(data["flags"]) == 4
    assert sample(
        "access_proxy_misuse_flags_total", category="cyber", source="admin"
    ) == flags_before + len(ladder)

    # Clearing removes the flags but not the misuse suspension.
    cleared = await admin.ok(
        "ops", "POST", STANDING.format(ws) + "/clear", {"reason": "reviewed by trust & safety"}
    )
    assert cleared["score"] == 0 and cleared["flags"] == []
    assert cleared["tier"] == "suspended" and cleared["suspended"] is True
    assert RFC3339_Z.fullmatch(cleared["suspended_at"])
    again = await admin.ok("dashboards", "GET", STANDING.format(ws))
    assert again["tier"] == "suspended"

    # Reinstating the workspace lifts it.
    await admin.ok("ops", "POST", f"/admin/v1/workspaces/{ws}/reinstate", {"reason": "appeal"})
    standing = await admin.ok("dashboards", "GET", STANDING.format(ws))
    assert standing["tier"] == "normal" and standing["suspended"] is False
    assert sample("access_proxy_tier_transitions_total", tier="normal") == (
        transitions["normal"] + 1
    )

    audit = await admin.ok("dashboards", "GET", "/admin/v1/audit")
    entries = [e for e in audit["entries"] if e["target"] == f"workspace:{ws}"]
    actions = [e["action"] for e in entries]
    assert actions == [
        "workspace.create",
        "standing.flag",
        "standing.flag",
        "standing.flag",
        "standing.flag",
        "standing.clear",
        "workspace.reinstate",
    ]
    flag_entries = [e for e in entries if e["action"] == "standing.flag"]
    assert [e["after"]["tier"] for e in flag_entries] == [t for _, _, t in ladder]
    assert [e["before"]["tier"] for e in flag_entries] == [
        "normal",
        "watch",
        "restricted",
        "cooldown",
    ]
    assert all(e["actor"] == "ops" for e in entries[1:])
    assert flag_entries[0]["reason"] == "seen watch"
    assert flag_entries[0]["after"]["flag"]["source"] == "analyst"
    clear, reinstate = entries[-2], entries[-1]
    assert clear["reason"] == "reviewed by trust & safety"
    assert clear["before"]["score"] == 8 and clear["after"]["score"] == 0
    assert reinstate["reason"] == "appeal"
    assert reinstate["before"]["misuse_suspended"] is True
    assert reinstate["after"]["misuse_suspended"] is False


# --------------------------------------------------------------------------- config reload


async def test_config_reload(reloading_admin: tuple[Admin, Path]) -> None:
    admin, path = reloading_admin
    data = await admin.ok("ops", "POST", "/admin/v1/config/reload")
    assert data["result"] == "unchanged"
    first_version = data["version"]

    path.write_text(config_text().replace("unlisted_models: allow", "unlisted_models: deny"))
    data = await admin.ok("ops", "POST", "/admin/v1/config/reload")
    assert data["result"] == "ok" and data["version"] != first_version
    assert data["changes"] and data["errors"] == []
    assert admin.holder.current.config.unlisted_models == "deny"
    good_version = data["version"]

    path.write_text(config_text().replace("unlisted_models: allow", "unlisted_models: maybe"))
    status, data = await admin.call("ops", "POST", "/admin/v1/config/reload")
    assert status == 422, data
    assert_error(data, "invalid_config")
    assert data["version"] == good_version
    assert any(e["path"] == "unlisted_models" for e in data["errors"]), data
    assert admin.holder.current.config.version == good_version

    status, data = await admin.call("ops", "POST", "/admin/v1/config/reload", {"x": 1})
    assert status == 422
    assert_error(data, "invalid_body", "x")


async def test_config_reload_without_a_reloader_is_an_internal_error(admin: Admin) -> None:
    status, data = await admin.call("ops", "POST", "/admin/v1/config/reload")
    assert status == 500
    assert_error(data, "internal_error")


# --------------------------------------------------------------------------- the CLI


async def test_cli_flags_standing_and_reload(reloading_admin: tuple[Admin, Path]) -> None:
    admin, path = reloading_admin
    await admin.org("acme")
    await admin.workspace("acme-dev", "acme")

    rc, out, err = await run_cli(
        admin,
        "flags",
        "add",
        "acme-dev",
        "--category",
        "cyber",
        "--severity",
        "3",
        "--source",
        "safety-pipeline",
        "--note",
        "port scan",
    )
    assert rc == 0, err
    assert "restricted" in out and "safety-pipeline" in out and "port scan" in out

    rc, out, err = await run_cli(admin, "standing", "show", "acme-dev", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert (doc["score"], doc["tier"]) == (3, "restricted")
    assert doc["flags"][0]["category"] == "cyber"

    rc, out, err = await run_cli(admin, "standing", "clear", "acme-dev", "--reason", "false alarm")
    assert rc == 0, err
    assert "normal" in out and "no flags in the window" in out

    rc, out, err = await run_cli(
        admin, "flags", "add", "acme-dev", "--category", "cyber", "--severity", "0", "--source", "a"
    )
    assert rc == 1 and "severity" in err and "422" in err

    rc, out, err = await run_cli(admin, "flags", "add", "acme-dev", "--category", "cyber")
    assert rc == 2 and "--severity" in err  # a usage error, caught before any call

    rc, out, err = await run_cli(admin, "standing", "show", "acme-dev", token="dashboards")
    assert rc == 0, err

    rc, out, err = await run_cli(admin, "config", "reload")
    assert rc == 0, err
    assert "unchanged" in out
    path.write_text(config_text().replace("unlisted_models: allow", "unlisted_models: maybe"))
    rc, out, err = await run_cli(admin, "config", "reload")
    assert rc == 1
    assert "invalid_config" in err and "unlisted_models" in err
