"""The key layout upgrade (``proxy/store/migrate.py``) on a real Redis: data written in the untagged
layout of single-node releases is read, changed and audited after the move exactly as before; the
move is idempotent and safe to run from several replicas at once; ``serve`` runs it at start."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import redis.asyncio

from proxy import config
from proxy.identity import parse_peppers
from proxy.store import schema
from proxy.store.audit import GENESIS, make_entry, read_entries, verify_chain
from proxy.store.facts import FactReader
from proxy.store.migrate import migrate, new_name
from proxy.store.usage import UsageStore
from proxy.store.writes import Actor, Writes

PEPPER = "v1:migration-pepper-0123456789abcdef"
ACTOR = Actor("old-release", "v-old")


async def _write_layout_1(r: redis.asyncio.Redis) -> str:
    """What an older release left behind: the same facts under the untagged names."""
    peppers = parse_peppers(PEPPER)
    digest = peppers.digest("sk-old-key")
    assert digest is not None
    now = time.time()
    grant = {
        "grant_id": "gr_old",
        "program": "gpt-5.6-preview",
        "product": "api",
        "subject": "workspace:ws-old",
        "models": None,
        "created_at": now,
        "approvals": [],
        "enable_at": now - 60,
        "expires_at": None,
        "suspended": False,
        "revoked": False,
    }
    text = json.dumps(grant, sort_keys=True, separators=(",", ":"))
    await r.hset("ap:org:org-old", mapping={"name": "Old", "suspended": "0", "created_at": now})
    await r.hset(
        "ap:ws:ws-old",
        mapping={"org_id": "org-old", "name": "w", "suspended": "0", "created_at": now},
    )
    await r.sadd("ap:orgws:org-old", "ws-old")
    await r.hset(
        "ap:apikey:k-old",
        mapping={
            "workspace_id": "ws-old",
            "digest": digest.hex(),
            "pepper_version": "v1",
            "name": "k",
            "created_at": now,
            "revoked_at": "",
        },
    )
    await r.set("ap:grant:gr_old", text)
    await r.hset("ap:sgrants:workspace:ws-old", "gpt-5.6-preview|api", text)
    await r.hset("ap:standing:ws-old", mapping={"suspended": "0", "suspended_at": ""})
    flag = {"id": "f1", "at": now, "category": "cyber", "severity": 1, "source": "a", "note": None}
    await r.zadd("ap:flags:ws-old", {json.dumps(flag): now})
    await r.hset("ap:usage:ws-old", mapping={"requests": 3, "output": 40, "cost_usd": "0.5"})
    await r.set("ap:rl:ws-old:gpt-5.6-preview", "123")
    await r.zadd("ap:cc:ws-old:gpt-5.6-preview", {"slot": 1.0})
    await r.zadd("ap:replicas", {"r1": 1.0})
    prev = GENESIS
    for seq, action in enumerate(("org.create", "workspace.create"), start=1):
        entry = make_entry(
            seq=seq,
            prev_hash=prev,
            at=now,
            actor="old",
            action=action,
            target="x",
            before=None,
            after={},
            config_version="v-old",
        )
        await r.rpush("ap:audit", json.dumps(entry, sort_keys=True, separators=(",", ":")))
        prev = entry["hash"]
    await r.hset("ap:audit:head", mapping={"seq": 2, "hash": prev})
    await r.set("other:app:key", "untouched")
    return prev


async def test_layout_1_data_works_after_the_move(redis_client: redis.asyncio.Redis) -> None:
    head = await _write_layout_1(redis_client)
    counts = await migrate(redis_client)
    assert counts == {"renamed": 11, "dropped": 3, "conflicts": 0}, counts

    keys = {k.decode() for k in await redis_client.keys("*")}
    assert all("{" in k for k in keys if k.startswith("ap:")), keys
    assert "other:app:key" in keys
    assert await redis_client.get(schema.SCHEMA_KEY) == str(schema.SCHEMA_VERSION).encode()

    facts = await FactReader(redis_client).workspace_facts("ws-old")
    assert facts is not None and facts.org is not None and facts.org.name == "Old"
    assert ("gpt-5.6-preview", "api") in facts.workspace_grants
    assert len(facts.standing.flags) == 1
    writes = Writes(redis_client)
    record = await FactReader(redis_client).key("k-old")
    assert record is not None and record.workspace_id == "ws-old"
    usage = await UsageStore(redis_client).read("ws-old")
    assert usage["requests"] == 3 and usage["tokens"]["output"] == 40

    # The chain goes on from the migrated head, and verifies whole.
    await writes.revoke_key(ACTOR, "k-old")
    entries = await read_entries(redis_client, 0, 100)
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert entries[2]["prev_hash"] == head
    assert verify_chain(entries) is None


async def test_the_move_is_idempotent_and_safe_from_many_replicas(
    redis_client: redis.asyncio.Redis,
) -> None:
    await _write_layout_1(redis_client)
    results = await asyncio.gather(*(migrate(redis_client) for _ in range(4)))
    assert sum(r["renamed"] for r in results) == 11
    assert sum(r["conflicts"] for r in results) == 0
    snapshot = sorted(k.decode() for k in await redis_client.keys("*"))
    assert await migrate(redis_client) == {"renamed": 0, "dropped": 0, "conflicts": 0}
    # A marker says the layout is current; even with it removed a rerun changes nothing.
    await redis_client.delete(schema.SCHEMA_KEY)
    assert (await migrate(redis_client))["renamed"] == 0
    assert sorted(k.decode() for k in await redis_client.keys("*")) == snapshot


def test_every_layout_1_name_maps_into_its_tag() -> None:
    expected: dict[str, Any] = {
        "ap:ws:a:b": schema.workspace_key("a:b"),
        "ap:sgrants:org:o1": schema.subject_grants_key("org:o1"),
        "ap:audit": schema.AUDIT_LIST,
        "ap:audit:head": schema.AUDIT_HEAD,
        "ap:usage:w": schema.usage_key("w"),
        "ap:rl:w:p": None,
        "ap:{ap}:ws:x": None,
        "ap:": None,
        "unrelated": None,
    }
    for old, new in expected.items():
        assert new_name(old) == new, old


async def test_serve_moves_the_keys_when_it_starts(
    redis_url: str, redis_client: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.server import build_proxy
    from tests.integration.conftest import config_text

    await _write_layout_1(redis_client)
    cfg = config.parse(config_text())
    monkeypatch.setenv("ACCESS_PROXY_PEPPER", PEPPER)
    proxy = await build_proxy(cfg, redis_url=redis_url)
    proxy.data_port = proxy.admin_port = 0
    await proxy.start()
    try:
        assert await redis_client.exists(schema.workspace_key("ws-old"))
        assert not await redis_client.exists("ap:ws:ws-old")
    finally:
        await proxy.stop()
