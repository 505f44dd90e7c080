"""``explain``: the decision the data plane would take now for a key or workspace, product and
model, with the rule that decided and the facts it was decided from.

Facts are read straight from Redis (never from a replica's cache), parsed by the same schema
functions the data plane's loaders use, and passed to the same pure ``decide``; rows the decision
function leaves to the data plane (rate limit, classifier) are named as not evaluated.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from proxy.config import Config, Program
from proxy.errors import CODES
from proxy.policy import Decision, Facts, Grant, RequestInfo, decide
from proxy.policy.eligibility import org_eligible
from proxy.policy.facts import Org
from proxy.policy.grants import grant_state, missing_approvals
from proxy.policy.standing import describe, evaluate_standing
from proxy.store import schema
from proxy.store.audit import rfc3339
from proxy.store.facts import FactReader
from proxy.store.schema import KeyRecord
from proxy.store.writes import NotFound


def time_or_none(t: float | None) -> str | None:
    return rfc3339(t) if t is not None else None


def required_approvals(cfg: Config, program: str) -> tuple[str, ...]:
    p = cfg.programs.get(program)
    return p.required_approvals if p is not None else ()


def grant_view(g: Grant, cfg: Config, now: float) -> dict[str, Any]:
    """A grant as the admin API shows it: recorded facts, RFC 3339 times and derived state."""
    required = required_approvals(cfg, g.program)
    return {
        **schema.grant_to_dict(g),  # the recorded facts; their times and approvals as shown:
        "state": str(grant_state(g, required, now)),
        "required_approvals": list(required),
        "approvals": [
            {"role": a.role, "reviewer": a.reviewer, "at": rfc3339(a.at)} for a in g.approvals
        ],
        "missing_approvals": list(missing_approvals(g, required)),
        "created_at": rfc3339(g.created_at),
        "enable_at": time_or_none(g.enable_at),
        "expires_at": time_or_none(g.expires_at),
        "suspended": g.suspended,
        "revoked": g.revoked,
    }


def _key_view(rec: KeyRecord | None) -> dict[str, Any] | None:
    if rec is None:
        return None
    return {"key_id": rec.key_id, "workspace_id": rec.workspace_id, "revoked": rec.revoked}


def _eligibility(program: Program | None, org: Org | None, has_grant: bool) -> dict[str, Any]:
    """Whether the subject's org may be granted the program now (SPEC §4), and whether an
    existing grant outlived a representative cleared after it was made."""
    required = program is not None and program.eligibility.requires_account_representative
    eligible = org_eligible(required, org)
    out: dict[str, Any] = {"requires_account_representative": required, "org_eligible": eligible}
    if has_grant and not eligible:
        out["note"] = (
            "the grant predates the org losing its account representative; it stays in force, "
            "subject to review, but a new grant could not be requested"
        )
    return out


def _answer(
    cfg: Config,
    now: float,
    request: dict[str, Any],
    code: str | None,
    rule: str,
    detail: str,
    facts: dict[str, Any],
    not_evaluated: list[str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "allowed": code is None,
        "status": CODES[code].status if code is not None else 200,
        "code": code,
        "rule": rule,
        "detail": detail,
        "at": rfc3339(now),
        "config_version": cfg.version,
        "request": request,
        "facts": facts,
        "not_evaluated": not_evaluated,
    }
    if extra:
        out.update(extra)
    return out


def explain_facts(
    cfg: Config,
    facts: Facts,
    req: RequestInfo,
    now: float,
    request: dict[str, Any],
    key: KeyRecord | None = None,
) -> dict[str, Any]:
    """The explain answer for known facts: ``decide`` plus the facts that went into it."""
    decision: Decision = decide(facts, cfg, req, now)
    ws, org = facts.workspace, facts.org
    view = evaluate_standing(facts.standing, cfg.misuse, now)
    program_name = cfg.program_of(req.model) if req.model is not None else None
    program = cfg.programs.get(program_name) if program_name is not None else None
    ws_grant: Grant | None = None
    org_grant: Grant | None = None
    if program is not None:
        ws_grant = facts.workspace_grants.get((program.name, req.product))
        org_grant = facts.org_grants.get((program.name, req.product))
    deciding = "workspace" if ws_grant is not None else "org" if org_grant is not None else None
    fact_view: dict[str, Any] = {
        "key": _key_view(key),
        "workspace": {"id": ws.workspace_id, "org_id": ws.org_id, "suspended": ws.suspended},
        "org": (
            {
                "id": org.org_id,
                "suspended": org.suspended,
                "account_representative": org.account_representative,
            }
            if org is not None
            else None
        ),
        "eligibility": _eligibility(program, org, deciding is not None),
        "standing": {**describe(view, time=rfc3339), "flags": len(facts.standing.flags)},
        "model_listed": program is not None,
        "unlisted_models": cfg.unlisted_models,
        "program": program.name if program is not None else None,
        "phase": program.phases.get(req.product, "closed") if program is not None else None,
        "deciding_grant": deciding,
        "grants": {
            "workspace": grant_view(ws_grant, cfg, now) if ws_grant is not None else None,
            "org": grant_view(org_grant, cfg, now) if org_grant is not None else None,
        },
    }
    not_evaluated: list[str] = []
    extra: dict[str, Any] = {}
    if decision.allowed:
        if decision.blocked_categories:
            not_evaluated.append(
                "category (classifier): " + ", ".join(sorted(decision.blocked_categories))
            )
        not_evaluated.append("rate_limit")
        if decision.rate_limit is not None:
            rl = decision.rate_limit
            extra["rate_limit"] = {
                "requests_per_minute": rl.requests_per_minute,
                "burst": rl.burst,
                "concurrent": rl.concurrent,
                "shadow": rl.shadow,
                "tokens_per_minute": rl.tokens_per_minute,
            }
    if decision.retry_after is not None:
        extra["retry_after"] = decision.retry_after
    if decision.shadow_rules:
        extra["shadow_rules"] = list(decision.shadow_rules)
    return _answer(
        cfg,
        now,
        request,
        decision.code,
        decision.rule,
        decision.detail,
        fact_view,
        not_evaluated,
        extra,
    )


async def explain(
    redis: aioredis.Redis,
    cfg: Config,
    *,
    product: str,
    model: str | None,
    now: float,
    key_id: str | None = None,
    workspace: str | None = None,
) -> dict[str, Any]:
    """Explain a request by ``key_id`` or by ``workspace``; NotFound for an unknown id."""
    request = {"key_id": key_id, "workspace": workspace, "product": product, "model": model}
    key: KeyRecord | None = None
    if key_id is not None:
        key = await FactReader(redis).key(key_id)
        if key is None:
            raise NotFound(f"key {key_id} not found", "key_id")
        if key.revoked:
            facts_view = {"key": _key_view(key)}
            return _answer(
                cfg,
                now,
                request,
                "invalid_api_key",
                "key.revoked",
                f"key {key_id} is revoked",
                facts_view,
                [],
            )
        workspace = key.workspace_id
    assert workspace is not None
    facts = await FactReader(redis).workspace_facts(workspace)
    if facts is None:
        if key is not None:
            return _answer(
                cfg,
                now,
                request,
                "invalid_api_key",
                "key.workspace_missing",
                f"the workspace {workspace} of key {key_id} does not exist",
                {"key": _key_view(key)},
                [],
            )
        raise NotFound(f"workspace {workspace} not found", "workspace")
    return explain_facts(cfg, facts, RequestInfo(product, model), now, request, key)
