"""The one reader of entitlement facts in Redis: keys, workspaces, orgs, grants and standing.

Every reader of a fact goes through here: the hot path behind the cache (``Entitlements``), the
admin API and ``explain`` directly, and the audited writes inside their WATCHed transaction
(pass the watched pipeline as ``via``: its commands run at once and see what the WATCH guards).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from proxy.policy.facts import NO_GRANTS, Facts, GrantMap, Org, Workspace
from proxy.policy.grants import Grant
from proxy.policy.standing import Standing
from proxy.store import schema
from proxy.store.schema import KeyRecord

Via = aioredis.Redis | Pipeline
NO_STANDING = Standing()


class FactReader:
    """Reads facts with ``redis``, or with ``via`` when given (a watched pipeline)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def _hash(self, key: str, via: Via | None) -> Any:
        return await (via or self.redis).hgetall(key)

    async def key(self, key_id: str, via: Via | None = None) -> KeyRecord | None:
        return schema.key_from_hash(key_id, await self._hash(schema.apikey_key(key_id), via))

    async def workspace(self, ws: str, via: Via | None = None) -> Workspace | None:
        return schema.workspace_from_hash(ws, await self._hash(schema.workspace_key(ws), via))

    async def org(self, org: str, via: Via | None = None) -> Org | None:
        return schema.org_from_hash(org, await self._hash(schema.org_key(org), via))

    async def grants(self, subject: str, via: Via | None = None) -> GrantMap:
        """The current grant of ``subject`` per (program, product)."""
        raw = await self._hash(schema.subject_grants_key(subject), via)
        return schema.grants_from_hash(raw) if raw else NO_GRANTS

    async def grant(self, grant_id: str, via: Via | None = None) -> Grant | None:
        raw = await (via or self.redis).get(schema.grant_key(grant_id))
        return schema.grant_from_json(raw) if raw else None

    async def grant_list(
        self, subject: str | None, program: str | None, product: str | None
    ) -> list[Grant]:
        """Current grants of ``subject`` (every grant ever made when None), filtered, oldest
        first."""
        if subject is not None:
            found = list((await self.grants(subject)).values())
        else:
            found = []
            async for k in self.redis.scan_iter(match=schema.GRANT_PATTERN, count=500):
                value = await self.redis.get(k)
                if value:
                    found.append(schema.grant_from_json(value))
        return sorted(
            (
                g
                for g in found
                if (program is None or g.program == program)
                and (product is None or g.product == product)
            ),
            key=lambda g: g.created_at,
        )

    async def subject_exists(self, subject: str) -> bool:
        kind, _, ident = subject.partition(":")
        if kind == "org":
            return bool(await self.redis.exists(schema.org_key(ident)))
        if kind == "workspace":
            return bool(await self.redis.exists(schema.workspace_key(ident)))
        return False

    async def standing(self, ws: str, via: Via | None = None) -> Standing:
        """The misuse standing: the recorded suspension and the flags (one round trip)."""
        if via is not None:  # a watched pipeline runs each command at once
            raw = await via.hgetall(schema.standing_key(ws))
            flags = await via.zrange(schema.flags_key(ws), 0, -1)
        else:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(schema.standing_key(ws))
                pipe.zrange(schema.flags_key(ws), 0, -1)
                raw, flags = await pipe.execute()
        if not raw and not flags:
            return NO_STANDING
        return schema.standing_from(raw, flags)

    async def workspace_facts(self, ws_id: str) -> Facts | None:
        """Everything a decision needs about one workspace, read at one instant (MULTI), or
        None when it does not exist."""
        ws = await self.workspace(ws_id)
        if ws is None:
            return None
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(schema.org_key(ws.org_id))
            pipe.hgetall(schema.subject_grants_key("workspace:" + ws_id))
            pipe.hgetall(schema.subject_grants_key("org:" + ws.org_id))
            pipe.hgetall(schema.standing_key(ws_id))
            pipe.zrange(schema.flags_key(ws_id), 0, -1)
            org_raw, ws_grants, org_grants, standing_raw, flags = await pipe.execute()
        return Facts(
            ws,
            schema.org_from_hash(ws.org_id, org_raw),
            schema.grants_from_hash(ws_grants),
            schema.grants_from_hash(org_grants),
            schema.standing_from(standing_raw, flags),
        )
