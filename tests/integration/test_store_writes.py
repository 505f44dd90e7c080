"""Audited writes against a real Redis (SPEC §4, §6, §7): every change leaves exactly one entry on
an unbroken hash chain, a refused change leaves none, concurrent changes keep the chain linear,
and no secret reaches the log."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis

from proxy import config, identity
from proxy.policy import Flag, GrantState, grant_state
from proxy.store import schema
from proxy.store.audit import read_entries, verify_chain
from proxy.store.schema import AUDIT_HEAD, AUDIT_LIST
from proxy.store.writes import Actor, Conflict, Invalid, NotFound, StoreError, Writes

T = TypeVar("T")
MISUSE = config.load(Path(__file__).resolve().parents[2] / "config" / "proxy.yaml").misuse
ACTOR = Actor("ops", "cfg-1")
PROVIDER = Actor("provider-review", "cfg-1")
GOVERNMENT = Actor("gov-review", "cfg-1")
PEPPERS = identity.parse_peppers("v1:store-writes-test-pepper-0123456789")
REQUIRED = ("provider", "government")


@pytest.fixture
async def writes(redis_client: aioredis.Redis) -> AsyncIterator[Writes]:
    yield Writes(redis_client)


async def entries(redis: aioredis.Redis) -> list[dict[str, Any]]:
    return await read_entries(redis, 0, 100_000)


async def audited(
    writes: Writes, action: str, target: str | None, change: Awaitable[T], actor: Actor = ACTOR
) -> T:
    """Run ``change``; it must append exactly one valid entry for ``action`` on ``target``."""
    before = await entries(writes.redis)
    result = await change
    after = await entries(writes.redis)
    assert after[: len(before)] == before, "earlier entries changed"
    assert len(after) == len(before) + 1, [e["action"] for e in after[len(before) :]]
    entry = after[-1]
    assert verify_chain(after) is None
    assert entry["seq"] == len(after)
    assert entry["action"] == action
    if target is not None:
        assert entry["target"] == target
    assert entry["actor"] == actor.name and entry["config_version"] == actor.config_version
    head = await writes.redis.hgetall(AUDIT_HEAD)
    assert head == {b"seq": str(entry["seq"]).encode(), b"hash": entry["hash"].encode()}
    return result


async def refused(writes: Writes, error: type[StoreError], change: Awaitable[Any]) -> StoreError:
    """Run ``change``; it must raise ``error`` and leave the log untouched."""
    before = await entries(writes.redis)
    with pytest.raises(error) as caught:
        await change
    assert await entries(writes.redis) == before
    return caught.value


async def seed(writes: Writes) -> None:
    await audited(writes, "org.create", "org:org1", writes.create_org(ACTOR, "org1", "Org one"))
    await audited(
        writes,
        "workspace.create",
        "workspace:ws1",
        writes.create_workspace(ACTOR, "ws1", "org1", "Workspace one"),
    )


# --------------------------------------------------------------------------- orgs and workspaces


async def test_org_and_workspace_lifecycle(writes: Writes) -> None:
    await seed(writes)
    assert await writes.read.org("org1") is not None
    ws = await writes.read.workspace("ws1")
    assert ws is not None and ws.org_id == "org1" and not ws.suspended

    await refused(writes, Conflict, writes.create_org(ACTOR, "org1", "again"))
    await refused(writes, Conflict, writes.create_workspace(ACTOR, "ws1", "org1", "again"))
    await refused(writes, Invalid, writes.create_workspace(ACTOR, "ws2", "no-such-org", ""))

    suspended = await audited(
        writes,
        "workspace.suspend",
        "workspace:ws1",
        writes.set_workspace_suspended(ACTOR, "ws1", True, "abuse report"),
    )
    assert suspended.suspended
    last = (await entries(writes.redis))[-1]
    assert last["reason"] == "abuse report"
    assert last["before"]["suspended"] is False and last["after"]["suspended"] is True
    reinstated = await audited(
        writes,
        "workspace.reinstate",
        "workspace:ws1",
        writes.set_workspace_suspended(ACTOR, "ws1", False, "cleared"),
    )
    assert not reinstated.suspended

    org = await audited(
        writes, "org.suspend", "org:org1", writes.set_org_suspended(ACTOR, "org1", True, "review")
    )
    assert org.suspended
    org = await audited(
        writes,
        "org.reinstate",
        "org:org1",
        writes.set_org_suspended(ACTOR, "org1", False, "review done"),
    )
    assert not org.suspended

    await refused(writes, NotFound, writes.set_workspace_suspended(ACTOR, "nope", True, "x"))
    await refused(writes, NotFound, writes.set_org_suspended(ACTOR, "nope", True, "x"))


# --------------------------------------------------------------------------- keys


async def test_keys_are_issued_and_revoked_with_no_secret_in_the_log(writes: Writes) -> None:
    await seed(writes)
    key_id, key = await audited(
        writes, "key.issue", None, writes.issue_key(ACTOR, "ws1", "ci", PEPPERS)
    )
    entry = (await entries(writes.redis))[-1]
    assert entry["target"] == f"key:{key_id}"
    assert entry["after"] == {"key_id": key_id, "workspace_id": "ws1", "name": "ci"}

    record = await writes.read.key(key_id)
    assert record is not None and record.workspace_id == "ws1" and not record.revoked
    assert record.digest == PEPPERS.digest(key)

    await audited(writes, "key.revoke", f"key:{key_id}", writes.revoke_key(ACTOR, key_id))
    record = await writes.read.key(key_id)
    assert record is not None and record.revoked

    await refused(writes, NotFound, writes.issue_key(ACTOR, "nope", "", PEPPERS))
    await refused(writes, NotFound, writes.revoke_key(ACTOR, "nope"))

    # Neither the key, nor its secret part, nor its digest is anywhere in the log.
    stored = await writes.redis.lrange(AUDIT_LIST, 0, -1)
    raw = "".join(r.decode() if isinstance(r, bytes) else r for r in stored)
    secret = key.removeprefix(f"{identity.KEY_PREFIX}{key_id}-")
    assert len(secret) >= 32
    for needle in (key, secret, record.digest.hex()):
        assert needle not in raw


# --------------------------------------------------------------------------- grants


async def test_grant_lifecycle(writes: Writes) -> None:
    await seed(writes)
    grant = await audited(
        writes,
        "grant.create",
        None,
        writes.create_grant(ACTOR, "gpt-5.6-preview", "api", "workspace:ws1", None, None),
    )
    gid = grant.grant_id
    now = time.time()
    assert grant_state(grant, REQUIRED, now) == GrantState.REQUESTED

    # One program + product + subject: a second request answers with the existing grant's id.
    conflict = await refused(
        writes,
        Conflict,
        writes.create_grant(ACTOR, "gpt-5.6-preview", "api", "workspace:ws1", None, None),
    )
    assert isinstance(conflict, Conflict) and conflict.existing_id == gid
    # Another product or another subject is another grant.
    codex = await audited(
        writes,
        "grant.create",
        None,
        writes.create_grant(ACTOR, "gpt-5.6-preview", "codex", "workspace:ws1", None, None),
    )
    org = await audited(
        writes,
        "grant.create",
        None,
        writes.create_grant(ACTOR, "gpt-5.6-preview", "api", "org:org1", ("gpt-5.6-sol",), None),
    )
    assert len({gid, codex.grant_id, org.grant_id}) == 3
    await refused(
        writes,
        Invalid,
        writes.create_grant(ACTOR, "gpt-5.6-preview", "api", "workspace:nope", None, None),
    )

    target = f"grant:{gid}"
    g = await audited(
        writes,
        "grant.approve",
        target,
        writes.approve_grant(PROVIDER, gid, "provider", "alice"),
        PROVIDER,
    )
    assert grant_state(g, REQUIRED, time.time()) == GrantState.PENDING_REVIEW
    # Distinct reviewers: alice cannot sign the second role, not even through another token,
    # nor can the provider's token sign it under another name; a role is signed once.
    await refused(writes, Conflict, writes.approve_grant(GOVERNMENT, gid, "government", "alice"))
    await refused(writes, Conflict, writes.approve_grant(PROVIDER, gid, "government", "bob"))
    await refused(writes, Conflict, writes.approve_grant(GOVERNMENT, gid, "provider", "bob"))
    g = await audited(
        writes,
        "grant.approve",
        target,
        writes.approve_grant(GOVERNMENT, gid, "government", "bob"),
        GOVERNMENT,
    )
    assert grant_state(g, REQUIRED, time.time()) == GrantState.APPROVED
    assert [(a.role, a.reviewer) for a in g.approvals] == [
        ("provider", "alice"),
        ("government", "bob"),
    ]

    at = time.time() + 3600
    g = await audited(writes, "grant.enable", target, writes.enable_grant(ACTOR, gid, at))
    assert g.enable_at == at
    assert grant_state(g, REQUIRED, time.time()) == GrantState.APPROVED
    assert grant_state(g, REQUIRED, at) == GrantState.ENABLED

    g = await audited(
        writes, "grant.suspend", target, writes.apply_grant_action(ACTOR, gid, "suspend", "review")
    )
    assert g.suspended
    g = await audited(
        writes, "grant.reinstate", target, writes.apply_grant_action(ACTOR, gid, "reinstate", "ok")
    )
    assert not g.suspended
    g = await audited(
        writes, "grant.revoke", target, writes.apply_grant_action(ACTOR, gid, "revoke", "ended")
    )
    assert g.revoked and grant_state(g, REQUIRED, time.time()) == GrantState.REVOKED
    last = (await entries(writes.redis))[-1]
    assert last["before"]["revoked"] is False and last["after"]["revoked"] is True
    assert last["reason"] == "ended"

    # Revoked is final: nothing changes it any more.
    for action in ("suspend", "reinstate", "revoke"):
        await refused(writes, Conflict, writes.apply_grant_action(ACTOR, gid, action, "again"))
    await refused(writes, Conflict, writes.enable_grant(ACTOR, gid, time.time()))
    await refused(writes, NotFound, writes.approve_grant(PROVIDER, "gr_nope", "provider", "x"))
    await refused(writes, NotFound, writes.enable_grant(ACTOR, "gr_nope", time.time()))

    # ...but a new grant may be requested in its place.
    renewed = await audited(
        writes,
        "grant.create",
        None,
        writes.create_grant(ACTOR, "gpt-5.6-preview", "api", "workspace:ws1", None, None),
    )
    assert renewed.grant_id != gid
    assert grant_state(renewed, REQUIRED, time.time()) == GrantState.REQUESTED
    # The subject's current grant is the new one; the revoked one is kept by its id.
    current = await writes.read.grant_list("workspace:ws1", "gpt-5.6-preview", "api")
    assert [c.grant_id for c in current] == [renewed.grant_id]
    old = await writes.read.grant(gid)
    assert old is not None and old.revoked
    stored = await writes.redis.hget(
        schema.subject_grants_key("workspace:ws1"), schema.grant_slot("gpt-5.6-preview", "api")
    )
    assert stored is not None and schema.grant_from_json(stored).grant_id == renewed.grant_id


# --------------------------------------------------------------------------- standing


async def test_flags_and_clearing_the_standing(writes: Writes) -> None:
    await seed(writes)
    now = time.time()
    before, after = await audited(
        writes,
        "standing.flag",
        "workspace:ws1",
        writes.add_flag(ACTOR, "ws1", Flag(now, "cyber", 3, "analyst", "seen in logs"), MISUSE),
    )
    assert (before.tier_name, after.tier_name) == ("normal", "restricted")
    entry = (await entries(writes.redis))[-1]
    assert entry["reason"] == "seen in logs"
    assert entry["after"]["flag"]["category"] == "cyber" and entry["after"]["score"] == 3

    _, after = await audited(
        writes,
        "standing.flag",
        "workspace:ws1",
        writes.add_flag(ACTOR, "ws1", Flag(now + 1, "cyber", 5, "analyst"), MISUSE),
    )
    assert after.suspended and after.tier_name == "suspended"
    standing = await writes.read.standing("ws1")
    assert standing.suspended and len(standing.flags) == 2

    before, view = await audited(
        writes,
        "standing.clear",
        "workspace:ws1",
        writes.clear_standing(ACTOR, "ws1", "reviewed", MISUSE),
    )
    # Clearing removes the flags but does not lift the recorded suspension.
    assert before.score > 0 and before.suspended
    assert view.score == 0 and view.suspended
    standing = await writes.read.standing("ws1")
    assert standing.flags == () and standing.suspended

    # Reinstating the workspace lifts it.
    await audited(
        writes,
        "workspace.reinstate",
        "workspace:ws1",
        writes.set_workspace_suspended(ACTOR, "ws1", False, "appeal granted"),
    )
    assert not (await writes.read.standing("ws1")).suspended
    last = (await entries(writes.redis))[-1]
    assert last["before"]["misuse_suspended"] is True and last["after"]["misuse_suspended"] is False

    flag = Flag(now, "cyber", 1, "analyst")
    await refused(writes, NotFound, writes.add_flag(ACTOR, "nope", flag, MISUSE))
    await refused(writes, NotFound, writes.clear_standing(ACTOR, "nope", "x", MISUSE))


# --------------------------------------------------------------------------- concurrency


async def test_concurrent_changes_keep_the_chain_linear(writes: Writes) -> None:
    await seed(writes)
    start = len(await entries(writes.redis))
    now = time.time()
    changes: list[Awaitable[Any]] = []
    for i in range(20):
        match i % 4:
            case 0:
                changes.append(writes.create_org(ACTOR, f"org-c{i}", ""))
            case 1:
                changes.append(writes.add_flag(ACTOR, "ws1", Flag(now + i, "spam", 1, "a"), MISUSE))
            case 2:
                changes.append(
                    writes.create_grant(ACTOR, f"p{i}", "api", "workspace:ws1", None, None)
                )
            case _:
                changes.append(writes.issue_key(ACTOR, "ws1", f"k{i}", PEPPERS))
    await asyncio.gather(*changes)

    log = await entries(writes.redis)
    assert len(log) == start + 20
    assert [e["seq"] for e in log] == list(range(1, start + 21))
    assert verify_chain(log) is None
    assert len({e["hash"] for e in log}) == len(log)
    head = await writes.redis.hgetall(AUDIT_HEAD)
    assert int(head[b"seq"]) == start + 20 and head[b"hash"] == log[-1]["hash"].encode()
    # Every change is there exactly once.
    assert len((await writes.read.standing("ws1")).flags) == 5
    actions = [e["action"] for e in log[start:]]
    assert {a: actions.count(a) for a in set(actions)} == {
        "org.create": 5,
        "standing.flag": 5,
        "grant.create": 5,
        "key.issue": 5,
    }


async def test_concurrent_conflicting_changes_record_only_the_winner(writes: Writes) -> None:
    await seed(writes)
    start = len(await entries(writes.redis))
    results = await asyncio.gather(
        *(
            writes.create_grant(ACTOR, "gpt-5.6-preview", "api", "workspace:ws1", None, None)
            for _ in range(10)
        ),
        return_exceptions=True,
    )
    made = [r for r in results if not isinstance(r, BaseException)]
    conflicts = [r for r in results if isinstance(r, Conflict)]
    assert len(made) == 1 and len(conflicts) == 9
    assert all(c.existing_id == made[0].grant_id for c in conflicts)
    log = await entries(writes.redis)
    assert len(log) == start + 1 and verify_chain(log) is None


async def test_a_tampered_entry_breaks_the_chain(writes: Writes) -> None:
    await seed(writes)
    log = await entries(writes.redis)
    assert verify_chain(log) is None
    log[0]["after"]["name"] = "Someone else"
    assert verify_chain(log) == 1
