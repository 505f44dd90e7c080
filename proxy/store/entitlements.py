"""Entitlement reads for the hot path: keys, workspaces, orgs, grants and standing, through the
in-process cache, with ``FactReader`` behind a deadline and breaker (SPEC §5).

On a cache hit ``facts_for`` makes no Redis round trip and does not await.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from proxy.config import CacheConfig
from proxy.policy.facts import Facts, GrantMap, Org, Workspace
from proxy.policy.standing import Standing
from proxy.store import schema
from proxy.store.cache import MISSING, FactCache
from proxy.store.connection import Gate
from proxy.store.facts import FactReader
from proxy.store.schema import KeyRecord


class Entitlements:
    def __init__(self, redis: aioredis.Redis, gate: Gate, cache: FactCache[Any]) -> None:
        self.redis = redis
        self.read = FactReader(redis)
        self.gate = gate
        self.cache = cache
        # Typed views of the one cache: each answers the type its loader reads.
        self._keys: FactCache[KeyRecord | None] = cache.typed()
        self._workspaces: FactCache[Workspace | None] = cache.typed()
        self._orgs: FactCache[Org | None] = cache.typed()
        self._grants: FactCache[GrantMap] = cache.typed()
        self._standings: FactCache[Standing] = cache.typed()

    # Loaders: one Redis round trip each, through the deadline and breaker.
    async def _load_key(self, key_id: str) -> KeyRecord | None:
        return await self.gate.call("key", lambda: self.read.key(key_id))

    async def _load_workspace(self, ws: str) -> Workspace | None:
        return await self.gate.call("workspace", lambda: self.read.workspace(ws))

    async def _load_org(self, org: str) -> Org | None:
        return await self.gate.call("org", lambda: self.read.org(org))

    async def _load_grants(self, subject: str) -> GrantMap:
        return await self.gate.call("grants", lambda: self.read.grants(subject))

    async def _load_standing(self, ws: str) -> Standing:
        return await self.gate.call("standing", lambda: self.read.standing(ws))

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
