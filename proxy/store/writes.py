"""Every change to entitlement facts, each with its audit entry in the same MULTI/EXEC.

A change WATCHes the audit head and the keys it reads, plans its writes from what it read, then
queues the writes and the chained audit entry in one transaction (retried if a watched key moved).
After EXEC it publishes the cache keys it touched so every replica evicts them (SPEC §5).
There is no self-service path: these run only for the admin API (and the data plane's upstream
safety flags).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from proxy import identity, metrics
from proxy.config import MisuseConfig
from proxy.policy.eligibility import org_eligible
from proxy.policy.facts import Org, Workspace
from proxy.policy.grants import Approval, Grant
from proxy.policy.standing import (
    Flag,
    Standing,
    StandingView,
    describe,
    evaluate_standing,
    reaches_suspension,
)
from proxy.store import schema
from proxy.store.audit import GENESIS, make_entry
from proxy.store.facts import FactReader
from proxy.store.invalidation import publish
from proxy.store.schema import AUDIT_HEAD, AUDIT_LIST

log = logging.getLogger(__name__)


class StoreError(Exception):
    code = "internal_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class NotFound(StoreError):
    code = "not_found"


class Conflict(StoreError):
    code = "conflict"

    def __init__(self, message: str, existing_id: str | None = None) -> None:
        super().__init__(message)
        self.existing_id = existing_id


class Invalid(StoreError):
    code = "invalid_body"


class NotEligible(StoreError):
    code = "not_eligible"


@dataclass(frozen=True, slots=True)
class Actor:
    name: str
    config_version: str


@dataclass
class Plan:
    before: Any
    after: Any
    apply: Callable[[Pipeline], Any]
    result: Any = None
    invalidate: list[str] = field(default_factory=list)
    target: str | None = None  # when only known after reading


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def workspace_dict(ws: Workspace, reason: str = "") -> dict[str, Any]:
    return {"id": ws.workspace_id, "org_id": ws.org_id, "name": ws.name, "suspended": ws.suspended}


def org_dict(org: Org) -> dict[str, Any]:
    return {
        "id": org.org_id,
        "name": org.name,
        "suspended": org.suspended,
        "account_representative": org.account_representative,
    }


class Writes:
    """The audited changes; ``read`` is the fact reader they (and the admin API) read with."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.read = FactReader(redis)

    async def _transact(
        self,
        actor: Actor,
        action: str,
        target: str,
        watch: list[str],
        plan: Callable[[Pipeline], Awaitable[Plan]],
        reason: str | None = None,
    ) -> Any:
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(AUDIT_HEAD, *watch)
                    p = await plan(pipe)
                    head = await pipe.hgetall(AUDIT_HEAD)
                    seq = int(head.get(b"seq", b"0")) + 1
                    prev_raw: Any = head.get(b"hash", GENESIS.encode())
                    prev = prev_raw.decode()
                    entry = make_entry(
                        seq=seq,
                        prev_hash=prev,
                        at=time.time(),
                        actor=actor.name,
                        action=action,
                        target=p.target or target,
                        before=p.before,
                        after=p.after,
                        config_version=actor.config_version,
                        reason=reason,
                    )
                    pipe.multi()  # type: ignore[no-untyped-call]
                    p.apply(pipe)
                    pipe.rpush(AUDIT_LIST, _dump(entry))
                    pipe.hset(AUDIT_HEAD, mapping={"seq": seq, "hash": entry["hash"]})
                    await pipe.execute()
                    break
                except WatchError:
                    continue
        try:
            await publish(self.redis, p.invalidate)
        except (aioredis.RedisError, OSError) as exc:  # bounded by the cache TTL
            log.warning("invalidation publish failed: %s", exc)
        return p.result

    # ------------------------------------------------------------------ orgs and workspaces

    async def create_org(
        self, actor: Actor, org_id: str, name: str, account_representative: str | None = None
    ) -> Org:
        key = schema.org_key(org_id)

        async def plan(pipe: Pipeline) -> Plan:
            if await pipe.exists(key):
                raise Conflict(f"org {org_id} already exists", org_id)
            org = Org(org_id, name, account_representative=account_representative)
            now = time.time()
            rep = account_representative or ""
            return Plan(
                None,
                org_dict(org),
                lambda p: p.hset(
                    key,
                    mapping={
                        "name": name,
                        "suspended": "0",
                        "created_at": now,
                        "account_representative": rep,
                    },
                ),
                org,
                [schema.c_org(org_id)],
            )

        return await self._transact(actor, "org.create", f"org:{org_id}", [key], plan)  # type: ignore[no-any-return]

    async def set_account_representative(
        self, actor: Actor, org_id: str, representative: str | None
    ) -> Org:
        """Set (or, with None, clear) the org's account representative; grants stay as they are."""
        action = "org.account_rep.set" if representative else "org.account_rep.clear"
        return await self._update_org(
            actor,
            action,
            org_id,
            {"account_representative": representative or ""},
            lambda org: replace(org, account_representative=representative),
        )

    async def _update_org(
        self,
        actor: Actor,
        action: str,
        org_id: str,
        fields: dict[Any, Any],
        change: Callable[[Org], Org],
        reason: str | None = None,
    ) -> Org:
        """Write ``fields`` of an existing org's hash; ``change`` says what the org becomes."""
        key = schema.org_key(org_id)

        async def plan(pipe: Pipeline) -> Plan:
            org = await self.read.org(org_id, via=pipe)
            if org is None:
                raise NotFound(f"org {org_id} not found")
            after = change(org)
            return Plan(
                org_dict(org),
                org_dict(after),
                lambda p: p.hset(key, mapping=fields),
                after,
                [schema.c_org(org_id)],
            )

        org: Org = await self._transact(actor, action, f"org:{org_id}", [key], plan, reason)
        return org

    async def org_of_subject(self, pipe: Pipeline, subject: str) -> Org | None:
        """The org a grant subject belongs to (the org itself, or a workspace's org), WATCHed."""
        kind, _, ident = subject.partition(":")
        if kind == "workspace":
            ws_key = schema.workspace_key(ident)
            await pipe.watch(ws_key)
            ws = await self.read.workspace(ident, via=pipe)
            if ws is None:
                return None
            ident = ws.org_id
        org_key = schema.org_key(ident)
        await pipe.watch(org_key)
        return await self.read.org(ident, via=pipe)

    async def create_workspace(self, actor: Actor, ws_id: str, org_id: str, name: str) -> Workspace:
        key = schema.workspace_key(ws_id)

        async def plan(pipe: Pipeline) -> Plan:
            if await pipe.exists(key):
                raise Conflict(f"workspace {ws_id} already exists", ws_id)
            if not await pipe.exists(schema.org_key(org_id)):
                raise Invalid(f"org {org_id!r} does not exist", "org_id")
            ws = Workspace(ws_id, org_id, name)
            now = time.time()

            def apply(p: Pipeline) -> None:
                p.hset(
                    key,
                    mapping={"org_id": org_id, "name": name, "suspended": "0", "created_at": now},
                )
                p.sadd(schema.org_workspaces_key(org_id), ws_id)

            return Plan(None, workspace_dict(ws), apply, ws, [schema.c_ws(ws_id)])

        return await self._transact(  # type: ignore[no-any-return]
            actor, "workspace.create", f"workspace:{ws_id}", [key, schema.org_key(org_id)], plan
        )

    async def set_workspace_suspended(
        self,
        actor: Actor,
        ws_id: str,
        suspended: bool,
        reason: str,
        misuse_cfg: MisuseConfig | None = None,
    ) -> Workspace:
        """Suspend, or reinstate: reinstating also lifts a misuse suspension (a tier change,
        counted when ``misuse_cfg`` is given)."""
        key = schema.workspace_key(ws_id)
        skey, fkey = schema.standing_key(ws_id), schema.flags_key(ws_id)
        lifted: list[Standing] = []

        async def plan(pipe: Pipeline) -> Plan:
            ws = await self.read.workspace(ws_id, via=pipe)
            if ws is None:
                raise NotFound(f"workspace {ws_id} not found")
            standing = await self.read.standing(ws_id, via=pipe)
            misuse = standing.suspended
            lifted[:] = [standing] if misuse and not suspended else []
            after = replace(ws, suspended=suspended)

            def apply(p: Pipeline) -> None:
                p.hset(key, mapping={"suspended": "1" if suspended else "0", "reason": reason})
                if not suspended and misuse:
                    p.hset(skey, mapping={"suspended": "0", "suspended_at": ""})

            before = {**workspace_dict(ws), "misuse_suspended": misuse}
            after_d = {**workspace_dict(after), "misuse_suspended": misuse and suspended}
            return Plan(
                before,
                after_d,
                apply,
                after,
                [schema.c_ws(ws_id), schema.c_standing(ws_id)],
            )

        action = "workspace.suspend" if suspended else "workspace.reinstate"
        ws: Workspace = await self._transact(
            actor, action, f"workspace:{ws_id}", [key, skey, fkey], plan, reason
        )
        if lifted and misuse_cfg is not None:
            now = time.time()
            _count_tier_change(
                evaluate_standing(lifted[0], misuse_cfg, now),
                evaluate_standing(replace(lifted[0], suspended=False), misuse_cfg, now),
            )
        return ws

    async def set_org_suspended(
        self, actor: Actor, org_id: str, suspended: bool, reason: str
    ) -> Org:
        return await self._update_org(
            actor,
            "org.suspend" if suspended else "org.reinstate",
            org_id,
            {"suspended": "1" if suspended else "0", "reason": reason},
            lambda org: replace(org, suspended=suspended),
            reason,
        )

    # ------------------------------------------------------------------ keys

    async def issue_key(
        self, actor: Actor, ws_id: str, name: str, peppers: identity.Peppers
    ) -> tuple[str, str]:
        key_id, key = identity.new_key()
        digest = peppers.digest(key)
        assert digest is not None
        rkey = schema.apikey_key(key_id)

        async def plan(pipe: Pipeline) -> Plan:
            if not await pipe.exists(schema.workspace_key(ws_id)):
                raise NotFound(f"workspace {ws_id} not found")
            now = time.time()
            return Plan(
                None,
                {"key_id": key_id, "workspace_id": ws_id, "name": name},
                lambda p: p.hset(
                    rkey,
                    mapping={
                        "workspace_id": ws_id,
                        "digest": digest.hex(),
                        "pepper_version": peppers.current,
                        "name": name,
                        "created_at": now,
                        "revoked_at": "",
                    },
                ),
                (key_id, key),
                [schema.c_key(key_id)],
            )

        return await self._transact(  # type: ignore[no-any-return]
            actor, "key.issue", f"key:{key_id}", [rkey, schema.workspace_key(ws_id)], plan
        )

    async def revoke_key(self, actor: Actor, key_id: str) -> None:
        rkey = schema.apikey_key(key_id)

        async def plan(pipe: Pipeline) -> Plan:
            rec = await self.read.key(key_id, via=pipe)
            if rec is None:
                raise NotFound(f"key {key_id} not found")
            summary = {"key_id": key_id, "workspace_id": rec.workspace_id, "name": rec.name}
            return Plan(
                {**summary, "revoked": rec.revoked},
                {**summary, "revoked": True},
                lambda p: p.hset(rkey, "revoked_at", time.time()),
                None,
                [schema.c_key(key_id)],
            )

        await self._transact(actor, "key.revoke", f"key:{key_id}", [rkey], plan)

    # ------------------------------------------------------------------ grants

    async def create_grant(
        self,
        actor: Actor,
        program: str,
        product: str,
        subject: str,
        models: tuple[str, ...] | None,
        expires_at: float | None,
        requires_account_representative: bool = False,
    ) -> Grant:
        """A new grant in state ``requested``; NotEligible when the program needs an account
        representative and the subject's org has none (checked in the same transaction)."""
        skey = schema.subject_grants_key(subject)
        slot = schema.grant_slot(program, product)
        grant = Grant(
            grant_id="gr_" + uuid.uuid4().hex[:20],
            program=program,
            product=product,
            subject=subject,
            models=models,
            created_at=time.time(),
            expires_at=expires_at,
        )

        async def plan(pipe: Pipeline) -> Plan:
            if not await self.read.subject_exists(subject):
                raise Invalid(f"subject {subject!r} does not exist", "subject")
            if requires_account_representative:
                org = await self.org_of_subject(pipe, subject)
                if not org_eligible(True, org):
                    raise NotEligible(
                        f"{program} is for organizations that work with an account "
                        f"representative; org {org.org_id if org else '?'} has none",
                        "subject",
                    )
            existing = await pipe.hget(skey, slot)
            if existing:
                old = schema.grant_from_json(existing)
                if not old.revoked:
                    raise Conflict(
                        f"a grant for {program} on {product} for {subject} exists",
                        old.grant_id,
                    )
            text = schema.grant_to_json(grant)

            def apply(p: Pipeline) -> None:
                p.set(schema.grant_key(grant.grant_id), text)
                p.hset(skey, slot, text)

            return Plan(None, schema.grant_to_dict(grant), apply, grant, [schema.c_grants(subject)])

        return await self._transact(  # type: ignore[no-any-return]
            actor, "grant.create", f"grant:{grant.grant_id}", [skey], plan
        )

    async def update_grant(
        self,
        actor: Actor,
        action: str,
        grant_id: str,
        change: Callable[[Grant], Grant],
        reason: str | None = None,
    ) -> Grant:
        gkey = schema.grant_key(grant_id)

        async def plan(pipe: Pipeline) -> Plan:
            old = await self.read.grant(grant_id, via=pipe)
            if old is None:
                raise NotFound(f"grant {grant_id} not found")
            if old.revoked:
                raise Conflict(f"grant {grant_id} is revoked; request a new grant", grant_id)
            new = change(old)
            skey = schema.subject_grants_key(old.subject)
            slot = schema.grant_slot(old.program, old.product)
            text = schema.grant_to_json(new)

            def apply(p: Pipeline) -> None:
                p.set(gkey, text)
                p.hset(skey, slot, text)

            return Plan(
                schema.grant_to_dict(old),
                schema.grant_to_dict(new),
                apply,
                new,
                [schema.c_grants(old.subject)],
            )

        return await self._transact(actor, action, f"grant:{grant_id}", [gkey], plan, reason)  # type: ignore[no-any-return]

    async def approve_grant(self, actor: Actor, grant_id: str, role: str, reviewer: str) -> Grant:
        def change(g: Grant) -> Grant:
            for a in g.approvals:
                if a.role == role:
                    raise Conflict(f"role {role} already approved this grant", g.grant_id)
                if a.reviewer == reviewer or (a.token and a.token == actor.name):
                    raise Conflict(
                        f"{a.reviewer} (token {a.token or '?'}) already approved this grant "
                        f"as {a.role}; each role needs a different reviewer",
                        g.grant_id,
                    )
            approval = Approval(role, reviewer, time.time(), actor.name)
            return replace(g, approvals=(*g.approvals, approval))

        return await self.update_grant(actor, "grant.approve", grant_id, change)

    async def enable_grant(self, actor: Actor, grant_id: str, at: float) -> Grant:
        return await self.update_grant(
            actor, "grant.enable", grant_id, lambda g: replace(g, enable_at=at)
        )

    async def apply_grant_action(
        self, actor: Actor, grant_id: str, action: str, reason: str
    ) -> Grant:
        """``suspend``, ``reinstate`` or ``revoke`` (final)."""
        changes: dict[str, Callable[[Grant], Grant]] = {
            "suspend": lambda g: replace(g, suspended=True),
            "reinstate": lambda g: replace(g, suspended=False),
            "revoke": lambda g: replace(g, revoked=True),
        }
        return await self.update_grant(actor, f"grant.{action}", grant_id, changes[action], reason)

    # ------------------------------------------------------------------ misuse standing

    async def add_flag(
        self, actor: Actor, ws_id: str, flag: Flag, misuse: MisuseConfig
    ) -> tuple[StandingView, StandingView]:
        """Record a flag; a score reaching a suspending tier records a misuse suspension.

        Returns the standing before and after, so the caller can count a tier transition.
        """
        skey, fkey = schema.standing_key(ws_id), schema.flags_key(ws_id)
        flag_id = uuid.uuid4().hex[:16]

        async def plan(pipe: Pipeline) -> Plan:
            before_s = await self._existing_standing(pipe, ws_id)
            before = evaluate_standing(before_s, misuse, flag.at)
            after_s = Standing(
                tuple(sorted((*before_s.flags, flag), key=lambda f: f.at)),
                before_s.suspended,
                before_s.suspended_at,
            )
            newly_suspended = not before_s.suspended and reaches_suspension(
                after_s, misuse, flag.at
            )
            if newly_suspended:
                after_s = replace(after_s, suspended=True, suspended_at=flag.at)
            after = evaluate_standing(after_s, misuse, flag.at)

            def apply(p: Pipeline) -> None:
                p.zadd(fkey, {schema.flag_to_json(flag, flag_id): flag.at})
                p.zremrangebyscore(fkey, "-inf", f"({flag.at - misuse.window_seconds}")
                if newly_suspended:
                    p.hset(skey, mapping={"suspended": "1", "suspended_at": flag.at})

            return Plan(
                describe(before),
                {
                    **describe(after),
                    "flag": {
                        "id": flag_id,
                        "category": flag.category,
                        "severity": flag.severity,
                        "source": flag.source,
                    },
                },
                apply,
                (before, after),
                [schema.c_standing(ws_id)],
            )

        before, after = await self._transact(
            actor, "standing.flag", f"workspace:{ws_id}", [skey, fkey], plan, flag.note
        )
        known = {c for t in misuse.tiers for c in t.blocked_categories}
        metrics.MISUSE_FLAGS.labels(
            flag.category if flag.category in known else "other",
            "upstream" if flag.source == "upstream" else "admin",
        ).inc()
        _count_tier_change(before, after)
        return before, after

    async def _existing_standing(self, pipe: Pipeline, ws_id: str) -> Standing:
        """A workspace's standing, read inside a watched transaction; NotFound if none."""
        if not await pipe.exists(schema.workspace_key(ws_id)):
            raise NotFound(f"workspace {ws_id} not found")
        return await self.read.standing(ws_id, via=pipe)

    async def clear_standing(
        self, actor: Actor, ws_id: str, reason: str, misuse: MisuseConfig
    ) -> tuple[StandingView, StandingView]:
        """Remove the flags (score 0). A misuse suspension stays until a reinstate.

        Returns the standing before and after."""
        skey, fkey = schema.standing_key(ws_id), schema.flags_key(ws_id)

        async def plan(pipe: Pipeline) -> Plan:
            before_s = await self._existing_standing(pipe, ws_id)
            now = time.time()
            before = evaluate_standing(before_s, misuse, now)
            after = evaluate_standing(Standing((), before_s.suspended), misuse, now)
            return Plan(
                {**describe(before), "flags": len(before_s.flags)},
                describe(after),
                lambda p: p.delete(fkey),
                (before, after),
                [schema.c_standing(ws_id)],
            )

        before, after = await self._transact(
            actor, "standing.clear", f"workspace:{ws_id}", [skey, fkey], plan, reason
        )
        _count_tier_change(before, after)
        return before, after


def _count_tier_change(before: StandingView, after: StandingView) -> None:
    """The one place a tier transition is counted (flags, clearing, reinstating)."""
    if after.tier_name != before.tier_name:
        metrics.TIER_TRANSITIONS.labels(after.tier_name).inc()
