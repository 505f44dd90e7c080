"""decide(): SPEC §3.4 rows 3 and 5–11 as one pure function.

Rows 1 (route), 2 (key) and 12 (rate limit, which needs Redis) are enforced around it by the data
plane; row 4 (body) is read before the call and passed in as ``RequestInfo.body_error`` so the
order of the table holds. The returned ``Decision`` names the rule that decided, for ``explain``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from proxy.config import Config, Program, RateLimit
from proxy.policy.facts import Facts
from proxy.policy.grants import ANSWER, Grant, GrantState, grant_state, missing_approvals
from proxy.policy.standing import StandingView, evaluate_standing


@dataclass(frozen=True, slots=True)
class RequestInfo:
    product: str
    model: str | None  # None: the request names no model (e.g. GET /v1/models)
    body_error: str | None = None  # "request_too_large" | "invalid_request"
    body_error_message: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    code: str | None  # None: allowed (subject to the rate limit and category check)
    rule: str  # what decided, e.g. "grant.enabled", "phase.closed"
    detail: str
    program: Program | None = None
    grant: Grant | None = None
    standing: StandingView | None = None
    rate_limit: RateLimit | None = None  # the limit to enforce, already scaled by tier
    retry_after: float | None = None
    blocked_categories: frozenset[str] = frozenset()  # ask the classifier when non-empty
    shadow_rules: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.code is None


def _deny(code: str, rule: str, detail: str, **kw: object) -> Decision:
    return Decision(code, rule, detail, **kw)  # type: ignore[arg-type]


def scaled(limit: RateLimit, factor: float) -> RateLimit:
    if factor == 1.0:
        return limit
    return RateLimit(
        requests_per_minute=max(1, int(limit.requests_per_minute * factor)),
        burst=max(0, int(limit.burst * factor)),
        concurrent=max(1, int(limit.concurrent * factor)),
        shadow=limit.shadow,
        tokens_per_minute=(
            None
            if limit.tokens_per_minute is None
            else max(1, int(limit.tokens_per_minute * factor))
        ),
    )


def decide_models(
    facts: Facts,
    cfg: Config,
    product: str,
    models: tuple[str, ...],
    now: float,
    body_error: str | None = None,
    body_error_message: str | None = None,
) -> Decision:
    """The decision for a request naming ``models`` (a batch names several): every model must
    be allowed; the first refusal answers. An allowed request is limited under the first model
    that belongs to a program."""
    if len(models) <= 1 or body_error is not None:
        model = models[0] if models and body_error is None else None
        return decide(facts, cfg, RequestInfo(product, model, body_error, body_error_message), now)
    chosen: Decision | None = None
    for model in models:
        decision = decide(facts, cfg, RequestInfo(product, model), now)
        if not decision.allowed:
            return decision
        if chosen is None or (chosen.program is None and decision.program is not None):
            chosen = decision
    assert chosen is not None
    return chosen


def decide(facts: Facts, cfg: Config, req: RequestInfo, now: float) -> Decision:
    view = evaluate_standing(facts.standing, cfg.misuse, now)
    denied = _suspension(facts, view)  # row 3
    if denied is not None:
        return denied
    if req.body_error is not None:  # row 4: the body, read before the call
        return _deny(req.body_error, "request.body", req.body_error_message or req.body_error)
    access = _model_access(facts, cfg, req, now)  # rows 5-9
    if isinstance(access, Decision):
        return access
    program, grant, rule, detail = access

    shadow: tuple[str, ...] = ()
    if view.shadow_tier is not None:
        shadow = (f"tier:{view.shadow_tier.name}",)
    tier = view.tier

    # Row 10.
    if view.cooldown_until is not None:
        return _deny(
            "misuse_cooldown",
            "misuse.cooldown",
            f"misuse score {view.score}: cooldown",
            program=program,
            grant=grant,
            standing=view,
            retry_after=max(1.0, math.ceil(view.cooldown_until - now)),
            shadow_rules=shadow,
        )

    # Row 11 is decided by the data plane with the classifier's answer for these categories.
    blocked: frozenset[str] = frozenset()
    if req.model is not None or (program is not None):
        cats = set(tier.blocked_categories) if tier is not None else set()
        if program is not None:
            cats.update(program.blocked_categories)
        blocked = frozenset(cats)

    base = cfg.rate_limits.for_program(program.name if program is not None else None)
    factor = tier.rate_limit_factor if tier is not None else 1.0
    return Decision(
        None,
        rule,
        detail,
        program=program,
        grant=grant,
        standing=view,
        rate_limit=scaled(base, factor),
        blocked_categories=blocked,
        shadow_rules=shadow,
    )


def _suspension(facts: Facts, view: StandingView) -> Decision | None:
    """Row 3: the workspace, its org, or its misuse standing is suspended."""
    ws = facts.workspace
    if ws.suspended:
        return _deny("workspace_suspended", "workspace.suspended", "suspended by an operator")
    if facts.org is not None and facts.org.suspended:
        return _deny("workspace_suspended", "org.suspended", f"org {ws.org_id} is suspended")
    if view.suspended:
        return _deny(
            "workspace_suspended",
            "misuse.suspended",
            f"misuse score {view.score} reached tier suspended",
            standing=view,
        )
    return None


Access = tuple[Program | None, Grant | None, str, str]  # program, grant, rule, detail


def _model_access(facts: Facts, cfg: Config, req: RequestInfo, now: float) -> Decision | Access:
    """Rows 5-9 for the requested model: a denial, or what lets the request go on."""
    if req.model is None:
        return None, None, "request.no_model", "the request names no model"
    name = cfg.program_of(req.model)
    if name is None:
        if cfg.unlisted_models == "deny":
            return _deny("model_not_found", "model.unlisted", "model in no program; denied")
        return None, None, "model.unlisted", "model in no program; unlisted_models: allow"
    program = cfg.programs[name]
    phase = program.phases.get(req.product, "closed")
    if phase == "closed":  # row 5
        detail = f"{program.name} is closed on {req.product}"
        return _deny("product_unavailable", "phase.closed", detail, program=program)
    if phase == "ga":
        return program, None, "phase.ga", f"{program.name} is generally available"
    grant = facts.grant_for(program.name, req.product)
    if grant is None:  # row 6
        detail = f"no grant for {program.name} on {req.product}"
        return _deny("model_not_found", "grant.none", detail, program=program)
    return _grant_access(program, grant, req.model, now)


def _grant_access(program: Program, grant: Grant, model: str, now: float) -> Decision | Access:
    """Rows 6-9 under the deciding grant, in the order its state is derived."""
    state = grant_state(grant, program.required_approvals, now)
    gid = grant.grant_id
    if state is not GrantState.REVOKED and not grant.covers_model(model):  # row 6
        detail = f"grant {gid} does not cover {model}"
        return _deny("model_not_found", "grant.model_subset", detail, program=program, grant=grant)
    code, rule = ANSWER[state]
    if state is GrantState.REQUESTED or state is GrantState.PENDING_REVIEW:
        missing = missing_approvals(grant, program.required_approvals)
        detail = f"grant {gid} awaits approval by {', '.join(missing)}"
    elif state is GrantState.APPROVED:
        when = "unset" if grant.enable_at is None else "in the future"
        detail = f"grant {gid} is approved; enable_at {when}"
    elif state is GrantState.EXPIRED:
        detail = f"grant {gid} has expired"
    else:  # revoked, suspended, enabled
        detail = f"grant {gid} is {state}"
    if code is not None:
        return _deny(code, rule, detail, program=program, grant=grant)
    return program, grant, rule, detail
