"""The audit log (SPEC §7): one chained entry per change, written in the change's own MULTI/EXEC,
no secrets in it, and ``access-proxy admin audit verify`` catching a tampered entry in Redis."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import redis.asyncio

from proxy.store.audit import GENESIS, chain_hash, verify_chain
from proxy.store.schema import AUDIT_HEAD, AUDIT_LIST, apikey_key, workspace_key
from tests.integration.conftest import RFC3339_Z, TOKENS, Admin, run_cli

ENTRY_FIELDS = {
    "seq",
    "at",
    "actor",
    "action",
    "target",
    "before",
    "after",
    "reason",
    "config_version",
    "prev_hash",
    "hash",
}


async def stored_entries(r: redis.asyncio.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in await r.lrange(AUDIT_LIST, 0, -1)]


async def test_every_change_appends_one_chained_entry(admin: Admin) -> None:
    await admin.org("acme")
    await admin.workspace("acme-dev", "acme")
    key = await admin.key("acme-dev")
    gid = (await admin.grant("workspace:acme-dev"))["grant_id"]
    approve = f"/admin/v1/grants/{gid}/approve"
    await admin.ok("provider-review", "POST", approve, {"role": "provider", "reviewer": "pat"})
    await admin.ok("gov-review", "POST", approve, {"role": "government", "reviewer": "gil"})
    await admin.ok("ops", "POST", f"/admin/v1/grants/{gid}/enable")
    await admin.ok("ops", "POST", f"/admin/v1/grants/{gid}/suspend", {"reason": "look"})
    await admin.ok("ops", "POST", f"/admin/v1/grants/{gid}/reinstate", {"reason": "fine"})
    await admin.ok("ops", "POST", "/admin/v1/workspaces/acme-dev/suspend", {"reason": "bill"})
    await admin.ok("ops", "POST", "/admin/v1/workspaces/acme-dev/reinstate", {"reason": "paid"})
    await admin.ok("ops", "POST", "/admin/v1/orgs/acme/suspend", {"reason": "legal"})
    await admin.ok("ops", "DELETE", f"/admin/v1/keys/{key['key_id']}", status=204)
    await admin.ok("ops", "POST", f"/admin/v1/grants/{gid}/revoke", {"reason": "ended"})

    # Refused requests change nothing and append nothing.
    refused = [
        ("ops", "POST", "/admin/v1/orgs", {"id": "acme"}),  # 409
        ("ops", "POST", "/admin/v1/grants/gr_nope/suspend", {"reason": "x"}),  # 404
        ("ops", "POST", f"/admin/v1/grants/{gid}/suspend", {"reason": "x"}),  # 409 revoked
        ("ops", "POST", "/admin/v1/workspaces", {"id": "w", "org_id": "nope"}),  # 422
        ("dashboards", "POST", "/admin/v1/orgs", {"id": "other"}),  # 403
        (None, "POST", "/admin/v1/orgs", {"id": "other"}),  # 401
    ]
    for token, method, path, body in refused:
        status, _ = await admin.call(token, method, path, body)
        assert status >= 400

    entries = await stored_entries(admin.redis)
    expected = [
        ("ops", "org.create", "org:acme", None),
        ("ops", "workspace.create", "workspace:acme-dev", None),
        ("ops", "key.issue", f"key:{key['key_id']}", None),
        ("ops", "grant.create", f"grant:{gid}", None),
        ("provider-review", "grant.approve", f"grant:{gid}", None),
        ("gov-review", "grant.approve", f"grant:{gid}", None),
        ("ops", "grant.enable", f"grant:{gid}", None),
        ("ops", "grant.suspend", f"grant:{gid}", "look"),
        ("ops", "grant.reinstate", f"grant:{gid}", "fine"),
        ("ops", "workspace.suspend", "workspace:acme-dev", "bill"),
        ("ops", "workspace.reinstate", "workspace:acme-dev", "paid"),
        ("ops", "org.suspend", "org:acme", "legal"),
        ("ops", "key.revoke", f"key:{key['key_id']}", None),
        ("ops", "grant.revoke", f"grant:{gid}", "ended"),
    ]
    assert [(e["actor"], e["action"], e["target"], e["reason"]) for e in entries] == expected
    prev = GENESIS
    for seq, entry in enumerate(entries, 1):
        assert set(entry) == ENTRY_FIELDS
        assert entry["seq"] == seq
        assert entry["prev_hash"] == prev and entry["hash"] == chain_hash(entry)
        assert entry["config_version"] == admin.cfg.version
        assert RFC3339_Z.fullmatch(entry["at"])
        prev = entry["hash"]
    head: dict[Any, Any] = await admin.redis.hgetall(AUDIT_HEAD)
    assert (int(head[b"seq"]), head[b"hash"].decode()) == (len(entries), prev)

    # Before and after say what changed.
    by_action = {e["action"]: e for e in entries}
    assert by_action["org.create"]["before"] is None
    assert by_action["org.create"]["after"]["id"] == "acme"
    assert by_action["org.suspend"]["before"]["suspended"] is False
    assert by_action["org.suspend"]["after"]["suspended"] is True
    gov = entries[5]
    assert [a["role"] for a in gov["before"]["approvals"]] == ["provider"]
    assert [a["role"] for a in gov["after"]["approvals"]] == ["provider", "government"]
    assert by_action["grant.revoke"]["after"]["revoked"] is True
    assert by_action["key.revoke"]["after"]["revoked"] is True

    # The API serves the same entries, paged by seq.
    page = await admin.ok("dashboards", "GET", "/admin/v1/audit", params={"limit": "5"})
    assert page["entries"] == entries[:5]
    assert page["head"] == {"seq": len(entries), "hash": prev}
    page = await admin.ok(
        "dashboards", "GET", "/admin/v1/audit", params={"after": "12", "limit": "1000"}
    )
    assert page["entries"] == entries[12:]
    for params in ({"limit": "0"}, {"limit": "1001"}, {"after": "-1"}, {"after": "x"}):
        status, data = await admin.call("dashboards", "GET", "/admin/v1/audit", params=params)
        assert status == 422 and data["error"]["param"] == next(iter(params)), data


async def test_secrets_never_reach_the_audit_log(admin: Admin) -> None:
    await admin.org("acme")
    await admin.workspace("acme-dev", "acme")
    key = await admin.key("acme-dev")
    stored_digest: Any = await admin.redis.hget(apikey_key(key["key_id"]), "digest")
    digest = stored_digest.decode()
    stored: list[Any] = await admin.redis.lrange(AUDIT_LIST, 0, -1)
    raw = b"".join(stored).decode()
    entry = (await stored_entries(admin.redis))[-1]
    assert entry["action"] == "key.issue"
    assert entry["after"] == {"key_id": key["key_id"], "workspace_id": "acme-dev", "name": "k"}
    secret = key["key"].rsplit("-", 1)[1]
    assert key["key"] not in raw and secret not in raw and digest not in raw
    for token, _ in TOKENS.values():
        assert token not in raw


async def test_verify_names_the_first_tampered_entry(admin: Admin) -> None:
    await admin.org("acme")
    for name in ("a", "b", "c", "d"):
        await admin.workspace(f"acme-{name}", "acme")
    rc, out, err = await run_cli(admin, "audit", "verify", token="dashboards")
    assert (rc, out.strip()) == (0, "audit chain ok: 5 entries"), err

    original: Any = await admin.redis.lindex(AUDIT_LIST, 2)
    assert original is not None
    forged = json.loads(original)
    forged["after"]["org_id"] = "evil-corp"
    await admin.redis.lset(AUDIT_LIST, 2, json.dumps(forged))
    rc, out, err = await run_cli(admin, "audit", "verify")
    assert rc == 1, (out, err)
    assert out.startswith("audit chain broken at entry 3:")
    assert verify_chain(await stored_entries(admin.redis)) == 3

    # Recomputing the forged entry's own hash does not help: the next entry's link breaks.
    forged["hash"] = chain_hash(forged)
    await admin.redis.lset(AUDIT_LIST, 2, json.dumps(forged))
    rc, out, _ = await run_cli(admin, "--json", "audit", "verify")
    assert rc == 1 and json.loads(out)["broken_seq"] == 4

    # A deleted entry is caught too.
    await admin.redis.lset(AUDIT_LIST, 2, original)
    rc, _, _ = await run_cli(admin, "audit", "verify")
    assert rc == 0
    await admin.redis.lrem(AUDIT_LIST, 1, original)
    rc, out, _ = await run_cli(admin, "audit", "verify")
    assert rc == 1 and out.startswith("audit chain broken at entry 3:")


async def test_concurrent_changes_keep_one_unbroken_chain(admin: Admin) -> None:
    await admin.org("acme")
    results = await asyncio.gather(
        *(
            admin.call("ops", "POST", "/admin/v1/workspaces", {"id": f"w{i}", "org_id": "acme"})
            for i in range(30)
        ),
        *(
            admin.call("ops", "POST", "/admin/v1/orgs/acme/suspend", {"reason": f"r{i}"})
            for i in range(5)
        ),
    )
    assert [status for status, _ in results] == [201] * 30 + [200] * 5
    entries = await stored_entries(admin.redis)
    assert [e["seq"] for e in entries] == list(range(1, 37))
    assert verify_chain(entries) is None
    assert sorted(e["target"] for e in entries if e["action"] == "workspace.create") == sorted(
        f"workspace:w{i}" for i in range(30)
    )


async def test_change_and_entry_share_one_multi_exec(admin: Admin, redis_url: str) -> None:
    await admin.org("acme")
    await admin.workspace("acme-dev", "acme")
    watcher = redis.asyncio.Redis.from_url(redis_url)
    commands: list[str] = []
    try:
        async with watcher.monitor() as monitor:
            await admin.ok("ops", "POST", "/admin/v1/workspaces/acme-dev/suspend", {"reason": "r"})

            async def until_exec() -> None:
                while True:
                    info = await monitor.next_command()
                    commands.append(str(info["command"]))
                    if info["command"] == "EXEC":
                        return

            await asyncio.wait_for(until_exec(), 10)
    finally:
        await watcher.aclose()
    names = [c.split(" ", 2)[:2] for c in commands]
    inside = names[names.index(["MULTI"]) + 1 : names.index(["EXEC"])]
    assert ["HSET", workspace_key("acme-dev")] in inside, commands
    assert ["RPUSH", AUDIT_LIST] in inside, commands
    assert ["HSET", AUDIT_HEAD] in inside, commands
