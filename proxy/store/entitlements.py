"""Entitlement reads for the hot path: keys, workspaces, orgs, grants and standing, through the
in-process cache, with Redis behind a deadline and breaker (SPEC §5).

On a cache hit ``facts_for`` makes no Redis round trip and does not await.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from proxy.config import CacheConfig
from proxy.policy.facts import NO_GRANTS, Facts, GrantMap, Org, Workspace
from proxy.policy.standing import Standing
from proxy.store import schema
from proxy.store.cache import MISSING, FactCache
from proxy.store.connection import Gate
from proxy.store.schema import KeyRecord

_NO_STANDING = Standing()


class Entitlements:
    def __init__(self, redis: aioredis.Redis, gate: Gate, cache: FactCache[Any]) -> None:
        self.redis = redis
        self.gate = gate
        self.cache = cache
        # Typed views of the one cache: each answers the type its loader reads.
        self._keys: FactCache[KeyRecord | None] = cache.typed()
        self._workspaces: FactCache[Workspace | None] = cache.typed()
        self._orgs: FactCache[Org | None] = cache.typed()
        self._grants: FactCache[GrantMap] = cache.typed()
        self._standings: FactCache[Standing] = cache.typed()

    # Loaders: one Redis round trip each, guarded.
    async def _load_key(self, key_id: str) -> KeyRecord | None:
        raw = await self.gate.call("key", lambda: self.redis.hgetall(schema.apikey_key(key_id)))
        return schema.key_from_hash(key_id, raw)

    async def _load_workspace(self, ws: str) -> Workspace | None:
        raw = await self.gate.call(
            "workspace", lambda: self.redis.hgetall(schema.workspace_key(ws))
        )
        return schema.workspace_from_hash(ws, raw)

    async def _load_org(self, org: str) -> Org | None:
        raw = await self.gate.call("org", lambda: self.redis.hgetall(schema.org_key(org)))
        return schema.org_from_hash(org, raw)

    async def _load_grants(self, subject: str) -> GrantMap:
        raw = await self.gate.call(
            "grants", lambda: self.redis.hgetall(schema.subject_grants_key(subject))
        )
        return schema.grants_from_hash(raw) if raw else NO_GRANTS

    async def _load_standing(self, ws: str) -> Standing:
        async def read() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(schema.standing_key(ws))
                pipe.zrange(schema.flags_key(ws), 0, -1)
                return await pipe.execute()

        raw, flags = await self.gate.call("standing", read)
        if not raw and not flags:
            return _NO_STANDING
        return schema.standing_from(raw, flags)

    async def key(self, key_id: str, cc: CacheConfig) -> KeyRecord | None:
        ck = schema.c_key(key_id)
        value = self._keys.fresh(ck, cc.ttl_seconds)
        if value is MISSING:
            value = await self._keys.load(
                ck, lambda: self._load_key(key_id), cc.stale_if_error_seconds
            )
        return value

    async def facts_for(self, ws_id: str, cc: CacheConfig) -> Facts | None:
        """Everything a decision needs about one workspace, or None if it does not exist."""
        ttl, stale = cc.ttl_seconds, cc.stale_if_error_seconds
        ws = self._workspaces.fresh(schema.c_ws(ws_id), ttl)
        if ws is MISSING:
            ws = await self._workspaces.load(
                schema.c_ws(ws_id), lambda: self._load_workspace(ws_id), stale
            )
        if ws is None:
            return None
        org_id = ws.org_id
        org = self._orgs.fresh(schema.c_org(org_id), ttl)
        if org is MISSING:
            org = await self._orgs.load(schema.c_org(org_id), lambda: self._load_org(org_id), stale)
        ws_subject = "workspace:" + ws_id
        ws_grants = self._grants.fresh(schema.c_grants(ws_subject), ttl)
        if ws_grants is MISSING:
            ws_grants = await self._grants.load(
                schema.c_grants(ws_subject), lambda: self._load_grants(ws_subject), stale
            )
        org_subject = "org:" + org_id
        org_grants = self._grants.fresh(schema.c_grants(org_subject), ttl)
        if org_grants is MISSING:
            org_grants = await self._grants.load(
                schema.c_grants(org_subject), lambda: self._load_grants(org_subject), stale
            )
        standing = self._standings.fresh(schema.c_standing(ws_id), ttl)
        if standing is MISSING:
            standing = await self._standings.load(
                schema.c_standing(ws_id), lambda: self._load_standing(ws_id), stale
            )
        return Facts(ws, org, ws_grants, org_grants, standing)
