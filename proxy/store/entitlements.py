"""Entitlement reads for the hot path: keys, workspaces, orgs, grants and standing, through the
in-process cache, with ``FactReader`` behind a deadline and breaker (SPEC §5).

On a cache hit ``facts_for`` makes no Redis round trip and does not await. A warm lookup is one
check of a memo (the assembled ``Facts`` of a workspace, the record of a key), which answers
exactly while each cache entry it was made of would (``proxy.store.cache.Memo``).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from proxy.config import CacheConfig
from proxy.policy.facts import Facts, GrantMap, Org, Workspace
from proxy.policy.standing import Standing
from proxy.store import schema
from proxy.store.cache import MISSING, FactCache, Memo
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
        self._key_memos: dict[str, Memo[KeyRecord | None]] = {}
        self._facts_memos: dict[str, Memo[Facts | None]] = {}

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
        known = self.cache.recall(self._key_memos.get(key_id), cc.ttl_seconds)
        if known is not MISSING:
            return known
        ck = schema.c_key(key_id)
        value = self._keys.fresh(ck, cc.ttl_seconds)
        if value is MISSING:
            value = await self._keys.load(
                ck, lambda: self._load_key(key_id), cc.stale_if_error_seconds
            )
        self._remember(self._key_memos, key_id, value, ((ck, value),))
        return value

    async def facts_for(self, ws_id: str, cc: CacheConfig) -> Facts | None:
        """Everything a decision needs about one workspace, or None if it does not exist."""
        known = self.cache.recall(self._facts_memos.get(ws_id), cc.ttl_seconds)
        if known is not MISSING:
            return known
        ttl, stale = cc.ttl_seconds, cc.stale_if_error_seconds
        c_ws = schema.c_ws(ws_id)
        ws = self._workspaces.fresh(c_ws, ttl)
        if ws is MISSING:
            ws = await self._workspaces.load(c_ws, lambda: self._load_workspace(ws_id), stale)
        if ws is None:
            self._remember(self._facts_memos, ws_id, None, ((c_ws, ws),))
            return None
        org_id = ws.org_id
        c_org = schema.c_org(org_id)
        org = self._orgs.fresh(c_org, ttl)
        if org is MISSING:
            org = await self._orgs.load(c_org, lambda: self._load_org(org_id), stale)
        ws_subject = "workspace:" + ws_id
        c_ws_grants = schema.c_grants(ws_subject)
        ws_grants = self._grants.fresh(c_ws_grants, ttl)
        if ws_grants is MISSING:
            ws_grants = await self._grants.load(
                c_ws_grants, lambda: self._load_grants(ws_subject), stale
            )
        org_subject = "org:" + org_id
        c_org_grants = schema.c_grants(org_subject)
        org_grants = self._grants.fresh(c_org_grants, ttl)
        if org_grants is MISSING:
            org_grants = await self._grants.load(
                c_org_grants, lambda: self._load_grants(org_subject), stale
            )
        c_standing = schema.c_standing(ws_id)
        standing = self._standings.fresh(c_standing, ttl)
        if standing is MISSING:
            standing = await self._standings.load(
                c_standing, lambda: self._load_standing(ws_id), stale
            )
        facts = Facts(ws, org, ws_grants, org_grants, standing)
        parts = (
            (c_ws, ws),
            (c_org, org),
            (c_ws_grants, ws_grants),
            (c_org_grants, org_grants),
            (c_standing, standing),
        )
        self._remember(self._facts_memos, ws_id, facts, parts)
        return facts

    def _remember(
        self,
        memos: dict[str, Memo[Any]],
        name: str,
        value: object,
        parts: tuple[tuple[str, object], ...],
    ) -> None:
        """Memoise ``value`` when every part is what the cache holds now (not what a read that
        raced an invalidation answered); at most one memo per workspace or key, and no more
        memos than the cache holds entries."""
        memo = self.cache.memo(value, parts)
        if memo is None:
            memos.pop(name, None)
            return
        if len(memos) >= self.cache.max_entries:
            memos.clear()
        memos[name] = memo
