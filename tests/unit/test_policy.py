"""decide() against SPEC §3.4 rows 3 to 11 and their order, and grant state derivation (SPEC §4).

The property test draws whole situations (workspace and org state, misuse standing, body errors,
product, model, workspace and org grants in every state) and checks decide() against an oracle
written here straight from the SPEC's table, independent of the policy's own helpers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import config
from proxy.config import Config
from proxy.policy import (
    Approval,
    Decision,
    Facts,
    Flag,
    Grant,
    GrantState,
    Org,
    RequestInfo,
    Standing,
    Workspace,
    decide,
    grant_state,
    missing_approvals,
)
from proxy.policy.eligibility import org_eligible
from proxy.policy.grants import ANSWER

CONFIG_YAML = """
upstreams:
  models: {url: "http://127.0.0.1:8089"}
routes:
  - {path_prefix: /v1/, product: api, upstream: models}
  - {path_prefix: /codex/v1/, product: codex, upstream: models, rewrite_prefix: /v1/}
  - {path_prefix: /chatgpt/v1/, product: chatgpt, upstream: models, rewrite_prefix: /v1/}
programs:
  gpt-5.6-preview:
    models: [gpt-5.6-sol, gpt-5.6-terra, gpt-5.6-luna]
    required_approvals: [provider, government]
    phases: {api: preview, codex: preview, chatgpt: closed}
    eligibility: {requires_account_representative: true}
  gpt-5.5-alpha:
    models: [gpt-5.5-alpha]
    required_approvals: [provider]
    phases: {api: preview, codex: closed, chatgpt: closed}
  gpt-5-main:
    models: [gpt-5-mini]
    required_approvals: [provider]
    phases: {api: ga, codex: preview, chatgpt: closed}
unlisted_models: allow
rate_limits:
  default: {requests_per_minute: 600, burst: 60, concurrent: 50}
  programs: {gpt-5.6-preview: {requests_per_minute: 120, burst: 20, concurrent: 10}}
"""

ALLOW_UNLISTED = config.parse(CONFIG_YAML)
DENY_UNLISTED = config.parse(CONFIG_YAML.replace("unlisted_models: allow", "unlisted_models: deny"))
NOW = 1_750_000_000.0
HOUR = 3600.0

PREVIEW = "gpt-5.6-preview"
ALPHA = "gpt-5.5-alpha"
MAIN = "gpt-5-main"
PRODUCTS = ("api", "codex", "chatgpt")

# The SPEC's programs, restated for the oracle: models, required roles, phase per product.
PROGRAMS: dict[str, tuple[tuple[str, ...], tuple[str, ...], dict[str, str]]] = {
    PREVIEW: (
        ("gpt-5.6-sol", "gpt-5.6-terra", "gpt-5.6-luna"),
        ("provider", "government"),
        {"api": "preview", "codex": "preview", "chatgpt": "closed"},
    ),
    ALPHA: (
        ("gpt-5.5-alpha",),
        ("provider",),
        {"api": "preview", "codex": "closed", "chatgpt": "closed"},
    ),
    MAIN: (("gpt-5-mini",), ("provider",), {"api": "ga", "codex": "preview", "chatgpt": "closed"}),
}
MODEL_PROGRAM = {m: name for name, (models, _, _) in PROGRAMS.items() for m in models}
UNLISTED_MODEL = "gpt-4o"
MODELS: tuple[str | None, ...] = (*MODEL_PROGRAM, UNLISTED_MODEL, None)


# --------------------------------------------------------------------------- builders


def make_grant(
    program: str = PREVIEW,
    product: str = "api",
    subject: str = "workspace:ws1",
    *,
    approvals: tuple[tuple[str, str], ...] = (("provider", "alice"), ("government", "bob")),
    enable_at: float | None = NOW - HOUR,
    expires_at: float | None = None,
    suspended: bool = False,
    revoked: bool = False,
    models: tuple[str, ...] | None = None,
    grant_id: str = "gr_ws",
) -> Grant:
    return Grant(
        grant_id=grant_id,
        program=program,
        product=product,
        subject=subject,
        models=models,
        created_at=NOW - 2 * HOUR,
        approvals=tuple(Approval(role, who, NOW - 2 * HOUR) for role, who in approvals),
        enable_at=enable_at,
        expires_at=expires_at,
        suspended=suspended,
        revoked=revoked,
    )


def make_facts(
    ws_grants: tuple[Grant, ...] = (),
    org_grants: tuple[Grant, ...] = (),
    *,
    ws_suspended: bool = False,
    org_suspended: bool = False,
    org_known: bool = True,
    standing: Standing | None = None,
) -> Facts:
    return Facts(
        workspace=Workspace("ws1", "org1", suspended=ws_suspended),
        org=Org("org1", suspended=org_suspended) if org_known else None,
        workspace_grants={(g.program, g.product): g for g in ws_grants},
        org_grants={(g.program, g.product): g for g in org_grants},
        standing=standing if standing is not None else Standing(),
    )


def ask(
    facts: Facts,
    model: str | None,
    product: str = "api",
    *,
    now: float = NOW,
    cfg: Config = ALLOW_UNLISTED,
    body_error: str | None = None,
) -> Decision:
    return decide(facts, cfg, RequestInfo(product, model, body_error), now)


def code_of(facts: Facts, model: str | None, product: str = "api", **kw: object) -> str | None:
    return ask(facts, model, product, **kw).code  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the oracle

# Misuse standings the property test draws, by what the SPEC says each one means.
STANDINGS: dict[str, Standing] = {
    "normal": Standing(),
    "watch": Standing((Flag(NOW - 60, "spam", 1, "analyst"),)),
    "restricted": Standing((Flag(NOW - 60, "cyber", 3, "analyst"),)),
    "cooldown": Standing((Flag(NOW - 60, "cyber", 5, "analyst"),)),
    "cooldown_served": Standing((Flag(NOW - 1000, "cyber", 5, "analyst"),)),
    # A flag that reaches the suspending tier records the suspension with it (Writes.add_flag).
    "suspended_by_score": Standing(
        (Flag(NOW - 60, "cyber", 8, "analyst"),), suspended=True, suspended_at=NOW - 60
    ),
    "suspended_recorded": Standing((), suspended=True, suspended_at=NOW - 10 * HOUR),
}
RESTRICTING = {"restricted", "cooldown_served"}  # handled as restricted: × 0.2 and cyber blocked


@dataclass(frozen=True)
class GrantSpec:
    approvals: tuple[tuple[str, str], ...]
    enable_at: float | None
    expires_at: float | None
    suspended: bool
    revoked: bool
    models: tuple[str, ...] | None


@dataclass(frozen=True)
class Situation:
    ws_suspended: bool
    org_suspended: bool
    org_known: bool
    standing: str
    body_error: str | None
    product: str
    model: str | None
    unlisted: str
    org_has_representative: bool = True
    ws_grants: Mapping[tuple[str, str], GrantSpec] = field(default_factory=dict)
    org_grants: Mapping[tuple[str, str], GrantSpec] = field(default_factory=dict)


def oracle(s: Situation) -> str | None:
    """The first failing row of SPEC §3.4 (rows 3 to 10), or None when the request may go on.

    Eligibility (an account representative) is judged when a grant is requested, never here:
    a grant outlives a representative cleared later (SPEC §4), so it plays no part below."""
    org_suspended = s.org_known and s.org_suspended
    if s.ws_suspended or org_suspended or s.standing.startswith("suspended"):
        return "workspace_suspended"
    if s.body_error is not None:
        return s.body_error
    if s.model is not None:
        program = MODEL_PROGRAM.get(s.model)
        if program is None:
            if s.unlisted == "deny":
                return "model_not_found"
        else:
            _, required, phases = PROGRAMS[program]
            phase = phases[s.product]
            if phase == "closed":
                return "product_unavailable"
            if phase == "preview":
                slot = (program, s.product)
                # The workspace grant decides whenever it exists, whatever its state.
                spec = s.ws_grants[slot] if slot in s.ws_grants else s.org_grants.get(slot)
                if spec is None or spec.revoked:
                    return "model_not_found"
                if spec.models is not None and s.model not in spec.models:
                    return "model_not_found"
                signed = {role: who for role, who in spec.approvals if role in required}
                distinct_reviewers = len(set(signed.values())) == len(signed)
                if set(signed) != set(required) or not distinct_reviewers:
                    return "access_pending_review"
                if spec.enable_at is None or spec.enable_at > NOW:
                    return "access_not_yet_enabled"
                if spec.suspended:
                    return "access_suspended"
                if spec.expires_at is not None and spec.expires_at <= NOW:
                    return "access_expired"
    if s.standing == "cooldown":
        return "misuse_cooldown"
    return None


# --------------------------------------------------------------------------- strategies

REVIEWERS = ("alice", "bob", "carol")
ENABLE_AT = st.sampled_from((NOW - HOUR, NOW - HOUR, NOW, None, NOW + 1, NOW + HOUR))
EXPIRES_AT = st.sampled_from((None, None, NOW + HOUR, NOW + 1, NOW, NOW - 1))
RARELY = st.integers(0, 4).map(lambda n: n == 0)


def grant_specs(program: str) -> st.SearchStrategy[GrantSpec]:
    models, required, _ = PROGRAMS[program]
    # Roles are recorded once each (the store refuses a second approval for a role); reviewers
    # may repeat, and a role outside the program's list may have signed too. Most grants are
    # fully signed by distinct reviewers, so the rows after row 7 are reached often.
    fully_signed = st.permutations([(role, REVIEWERS[i]) for i, role in enumerate(required)])
    any_signatures = st.lists(
        st.tuples(st.sampled_from((*required, "observer")), st.sampled_from(REVIEWERS)),
        unique_by=lambda a: a[0],
    )
    return st.builds(
        GrantSpec,
        approvals=st.one_of(fully_signed, fully_signed, any_signatures).map(tuple),
        enable_at=ENABLE_AT,
        expires_at=EXPIRES_AT,
        suspended=RARELY,
        revoked=RARELY,
        models=st.one_of(st.none(), st.lists(st.sampled_from(models), unique=True).map(tuple)),
    )


SLOTS = tuple((p, prod) for p in PROGRAMS for prod in PRODUCTS)
GRANTS = {name: grant_specs(name) for name in PROGRAMS}
MAYBE_GRANT = {name: st.one_of(st.none(), GRANTS[name]) for name in PROGRAMS}
ANY_SLOT = st.sampled_from(SLOTS)
STANDING_NAMES = st.sampled_from(("normal",) * 10 + tuple(STANDINGS))
MODEL_NAMES = st.sampled_from((*PROGRAMS[PREVIEW][0], *MODELS))
BODY_ERRORS = st.sampled_from((None,) * 8 + ("invalid_request", "request_too_large"))
SELDOM = st.integers(0, 19).map(lambda n: n == 0)
OFTEN = st.integers(0, 3).map(lambda n: n > 0)


def draw_grants(
    draw: st.DrawFn, wanted: tuple[str, str] | None
) -> dict[tuple[str, str], GrantSpec]:
    """Usually a grant for the slot the request is for, and maybe one for some other slot."""
    grants: dict[tuple[str, str], GrantSpec] = {}
    other = draw(ANY_SLOT)
    if (spec := draw(MAYBE_GRANT[other[0]])) is not None:
        grants[other] = spec
    if wanted is not None and draw(OFTEN):
        grants[wanted] = draw(GRANTS[wanted[0]])
    return grants


@st.composite
def situations(draw: st.DrawFn) -> Situation:
    product = draw(st.sampled_from(PRODUCTS))
    model = draw(MODEL_NAMES)
    program = MODEL_PROGRAM.get(model) if model is not None else None
    wanted = (program, product) if program is not None else None
    return Situation(
        ws_suspended=draw(SELDOM),
        org_suspended=draw(SELDOM),
        org_known=not draw(SELDOM),
        standing=draw(STANDING_NAMES),
        body_error=draw(BODY_ERRORS),
        product=product,
        model=model,
        unlisted=draw(st.sampled_from(("allow", "deny"))),
        org_has_representative=draw(st.booleans()),
        ws_grants=draw_grants(draw, wanted),
        org_grants=draw_grants(draw, wanted),
    )


def to_grant(slot: tuple[str, str], spec: GrantSpec, subject: str) -> Grant:
    return make_grant(
        slot[0],
        slot[1],
        subject,
        approvals=spec.approvals,
        enable_at=spec.enable_at,
        expires_at=spec.expires_at,
        suspended=spec.suspended,
        revoked=spec.revoked,
        models=spec.models,
        grant_id=f"gr_{subject}_{slot[0]}_{slot[1]}",
    )


def facts_of(s: Situation) -> Facts:
    return Facts(
        workspace=Workspace("ws1", "org1", suspended=s.ws_suspended),
        org=(
            Org(
                "org1",
                suspended=s.org_suspended,
                account_representative="Dana" if s.org_has_representative else None,
            )
            if s.org_known
            else None
        ),
        workspace_grants={k: to_grant(k, v, "workspace:ws1") for k, v in s.ws_grants.items()},
        org_grants={k: to_grant(k, v, "org:org1") for k, v in s.org_grants.items()},
        standing=STANDINGS[s.standing],
    )


@settings(max_examples=400, deadline=None)
@given(situations())
def test_first_failing_row_answers(s: Situation) -> None:
    cfg = ALLOW_UNLISTED if s.unlisted == "allow" else DENY_UNLISTED
    decision = decide(facts_of(s), cfg, RequestInfo(s.product, s.model, s.body_error), NOW)
    assert decision.code == oracle(s), decision
    assert decision.allowed is (decision.code is None)
    if not decision.allowed:
        return
    # Allowed: the limits and categories handed to rows 11 and 12 follow the tier.
    program = MODEL_PROGRAM.get(s.model) if s.model is not None else None
    base = cfg.rate_limits.for_program(program)
    factor = 0.2 if s.standing in RESTRICTING else 1.0
    assert decision.rate_limit is not None
    assert decision.rate_limit.requests_per_minute == max(1, int(base.requests_per_minute * factor))
    cyber_blocked = s.standing in RESTRICTING and s.model is not None
    assert decision.blocked_categories == (frozenset({"cyber"}) if cyber_blocked else frozenset())
    if program is not None and PROGRAMS[program][2][s.product] == "preview":
        slot = (program, s.product)
        expected = "workspace:ws1" if slot in s.ws_grants else "org:org1"
        assert decision.grant is not None and decision.grant.subject == expected


def eligibility_oracle(program: str, org_known: bool, representative: str | None) -> bool:
    """SPEC §4 restated: a program that requires an account representative may be requested
    only for an org (or a workspace of an org) that has one."""
    requires = program == PREVIEW  # the only program of CONFIG_YAML with the requirement
    return not requires or (org_known and bool(representative))


@settings(max_examples=200, deadline=None)
@given(
    program=st.sampled_from(tuple(PROGRAMS)),
    org_known=st.booleans(),
    representative=st.sampled_from((None, "", "Dana Reyes")),
)
def test_a_grant_may_be_requested_exactly_when_the_org_is_eligible(
    program: str, org_known: bool, representative: str | None
) -> None:
    org = Org("org1", account_representative=representative) if org_known else None
    requires = ALLOW_UNLISTED.programs[program].eligibility.requires_account_representative
    assert org_eligible(requires, org) is eligibility_oracle(program, org_known, representative)


# --------------------------------------------------------------------------- rows 3 and 4


def test_an_enabled_grant_allows() -> None:
    decision = ask(make_facts((make_grant(),)), "gpt-5.6-sol")
    assert decision.allowed
    assert decision.rule == "grant.enabled"
    assert decision.program is not None and decision.program.name == PREVIEW


@pytest.mark.parametrize(
    ("facts", "rule"),
    [
        (make_facts((make_grant(),), ws_suspended=True), "workspace.suspended"),
        (make_facts((make_grant(),), org_suspended=True), "org.suspended"),
        (
            make_facts((make_grant(),), standing=Standing((), suspended=True)),
            "misuse.suspended",
        ),
    ],
)
def test_suspension_answers_before_the_body_error(facts: Facts, rule: str) -> None:
    for body_error in ("invalid_request", "request_too_large"):
        decision = ask(facts, "gpt-5.6-sol", body_error=body_error)
        assert (decision.code, decision.rule) == ("workspace_suspended", rule)
    # Also for requests that name no model, and for models in no program.
    assert code_of(facts, None) == "workspace_suspended"
    assert code_of(facts, UNLISTED_MODEL) == "workspace_suspended"


def test_an_org_suspension_cuts_off_every_workspace_whatever_their_grants() -> None:
    facts = make_facts((make_grant(),), (make_grant(subject="org:org1"),), org_suspended=True)
    assert code_of(facts, "gpt-5.6-sol") == "workspace_suspended"


@pytest.mark.parametrize("body_error", ["invalid_request", "request_too_large"])
def test_the_body_error_answers_before_program_and_grant_checks(body_error: str) -> None:
    # chatgpt is closed for the preview, and there is no grant at all: row 4 still answers.
    assert code_of(make_facts(), "gpt-5.6-sol", "chatgpt", body_error=body_error) == body_error
    assert code_of(make_facts(), "gpt-5.6-sol", body_error=body_error) == body_error


# --------------------------------------------------------------------------- row 5


def test_closed_answers_before_every_grant_check() -> None:
    grants = (
        make_grant(PREVIEW, "chatgpt"),
        make_grant(PREVIEW, "chatgpt", subject="org:org1", revoked=True),
    )
    standing = STANDINGS["cooldown"]
    for ws_grants in ((), grants[:1]):
        facts = make_facts(ws_grants, grants[1:], standing=standing)
        assert code_of(facts, "gpt-5.6-sol", "chatgpt") == "product_unavailable"


def test_a_product_missing_from_the_phases_is_closed() -> None:
    cfg = config.parse(
        CONFIG_YAML.replace("phases: {api: ga, codex: preview, chatgpt: closed}", "phases: {}")
    )
    assert code_of(make_facts(), "gpt-5-mini", "api", cfg=cfg) == "product_unavailable"


# --------------------------------------------------------------------------- row 6


def test_no_grant_is_model_not_found_and_reveals_nothing() -> None:
    decision = ask(make_facts(), "gpt-5.6-sol")
    assert (decision.code, decision.rule) == ("model_not_found", "grant.none")


def test_an_api_grant_never_opens_codex_and_the_other_way_round() -> None:
    api_only = make_facts((make_grant(PREVIEW, "api"),), (make_grant(PREVIEW, "api", "org:org1"),))
    assert code_of(api_only, "gpt-5.6-sol", "api") is None
    assert code_of(api_only, "gpt-5.6-sol", "codex") == "model_not_found"
    codex_only = make_facts((make_grant(PREVIEW, "codex"),))
    assert code_of(codex_only, "gpt-5.6-sol", "codex") is None
    assert code_of(codex_only, "gpt-5.6-sol", "api") == "model_not_found"


def test_an_alpha_grant_never_opens_the_preview() -> None:
    alpha = make_grant(ALPHA, "api", approvals=(("provider", "alice"),))
    facts = make_facts((alpha,), (replace(alpha, subject="org:org1"),))
    assert code_of(facts, "gpt-5.5-alpha") is None
    for model in PROGRAMS[PREVIEW][0]:
        assert code_of(facts, model) == "model_not_found"


def test_a_model_subset_grant_covers_only_its_models() -> None:
    facts = make_facts((make_grant(models=("gpt-5.6-sol",)),))
    assert code_of(facts, "gpt-5.6-sol") is None
    decision = ask(facts, "gpt-5.6-terra")
    assert (decision.code, decision.rule) == ("model_not_found", "grant.model_subset")


def test_a_revoked_grant_is_model_not_found_even_when_pending_or_suspended() -> None:
    for grant in (
        make_grant(revoked=True),
        make_grant(revoked=True, approvals=()),
        make_grant(revoked=True, suspended=True, expires_at=NOW - 1),
    ):
        decision = ask(make_facts((grant,)), "gpt-5.6-sol")
        assert (decision.code, decision.rule) == ("model_not_found", "grant.revoked")


# --------------------------------------------------------------------------- workspace over org


@pytest.mark.parametrize(
    ("ws_grant", "expected"),
    [
        (make_grant(suspended=True), "access_suspended"),
        (make_grant(revoked=True), "model_not_found"),
        (make_grant(approvals=(("provider", "alice"),)), "access_pending_review"),
        (make_grant(enable_at=None), "access_not_yet_enabled"),
        (make_grant(expires_at=NOW - 1), "access_expired"),
        (make_grant(models=("gpt-5.6-luna",)), "model_not_found"),
    ],
)
def test_a_workspace_grant_cuts_one_workspace_off_an_approved_org(
    ws_grant: Grant, expected: str
) -> None:
    org_grant = make_grant(subject="org:org1", grant_id="gr_org")
    assert code_of(make_facts((), (org_grant,)), "gpt-5.6-sol") is None
    decision = ask(make_facts((ws_grant,), (org_grant,)), "gpt-5.6-sol")
    assert decision.code == expected
    assert decision.grant is None or decision.grant.grant_id == "gr_ws"


def test_an_enabled_workspace_grant_opens_a_workspace_of_a_pending_org() -> None:
    org_grant = make_grant(subject="org:org1", approvals=(), grant_id="gr_org")
    facts = make_facts((make_grant(),), (org_grant,))
    decision = ask(facts, "gpt-5.6-sol")
    assert decision.allowed and decision.grant is not None
    assert decision.grant.grant_id == "gr_ws"


def test_an_org_grant_covers_its_workspaces() -> None:
    decision = ask(
        make_facts((), (make_grant(subject="org:org1", grant_id="gr_org"),)), "gpt-5.6-sol"
    )
    assert decision.allowed and decision.grant is not None
    assert decision.grant.grant_id == "gr_org"


# --------------------------------------------------------------------------- rows 7 to 9


def test_every_required_role_must_sign() -> None:
    assert (
        code_of(make_facts((make_grant(approvals=()),)), "gpt-5.6-sol") == "access_pending_review"
    )
    provider_only = make_grant(approvals=(("provider", "alice"),))
    decision = ask(make_facts((provider_only,)), "gpt-5.6-sol")
    assert (decision.code, decision.rule) == ("access_pending_review", "grant.pending_review")
    assert "government" in decision.detail


def test_one_reviewer_signing_both_roles_counts_once() -> None:
    same = make_grant(approvals=(("provider", "alice"), ("government", "alice")))
    assert code_of(make_facts((same,)), "gpt-5.6-sol") == "access_pending_review"
    assert missing_approvals(same, ("provider", "government")) == ("government",)
    distinct = make_grant(approvals=(("government", "bob"), ("provider", "alice")))
    assert code_of(make_facts((distinct,)), "gpt-5.6-sol") is None


def test_a_role_outside_the_program_does_not_count() -> None:
    grant = make_grant(approvals=(("provider", "alice"), ("observer", "bob")))
    assert code_of(make_facts((grant,)), "gpt-5.6-sol") == "access_pending_review"


def test_pending_review_answers_before_enablement_suspension_and_expiry() -> None:
    grant = make_grant(approvals=(), enable_at=None, suspended=True, expires_at=NOW - 1)
    assert code_of(make_facts((grant,)), "gpt-5.6-sol") == "access_pending_review"


def test_enable_at_in_the_future_then_allowed_by_the_clock_alone() -> None:
    facts = make_facts((make_grant(enable_at=NOW + 60),))
    decision = ask(facts, "gpt-5.6-sol")
    assert (decision.code, decision.detail.endswith("in the future")) == (
        "access_not_yet_enabled",
        True,
    )
    assert code_of(facts, "gpt-5.6-sol", now=NOW + 59.999) == "access_not_yet_enabled"
    assert code_of(facts, "gpt-5.6-sol", now=NOW + 60) is None
    assert code_of(facts, "gpt-5.6-sol", now=NOW + 10 * HOUR) is None


def test_an_approved_grant_without_enable_at_is_not_yet_enabled() -> None:
    decision = ask(make_facts((make_grant(enable_at=None),)), "gpt-5.6-sol")
    assert decision.code == "access_not_yet_enabled"
    assert decision.detail.endswith("unset")


def test_not_yet_enabled_answers_before_suspension_and_expiry() -> None:
    grant = make_grant(enable_at=NOW + 60, suspended=True, expires_at=NOW - 1)
    assert code_of(make_facts((grant,)), "gpt-5.6-sol") == "access_not_yet_enabled"


def test_expiry_by_the_clock_alone() -> None:
    facts = make_facts((make_grant(expires_at=NOW + 60),))
    assert code_of(facts, "gpt-5.6-sol") is None
    assert code_of(facts, "gpt-5.6-sol", now=NOW + 59.999) is None
    assert code_of(facts, "gpt-5.6-sol", now=NOW + 60) == "access_expired"


def test_a_suspended_grant_is_access_suspended() -> None:
    decision = ask(make_facts((make_grant(suspended=True),)), "gpt-5.6-sol")
    assert (decision.code, decision.rule) == ("access_suspended", "grant.suspended")


def test_grant_denials_answer_before_the_misuse_cooldown() -> None:
    standing = STANDINGS["cooldown"]
    assert code_of(make_facts(standing=standing), "gpt-5.6-sol") == "model_not_found"
    grant = make_grant(suspended=True)
    assert code_of(make_facts((grant,), standing=standing), "gpt-5.6-sol") == "access_suspended"
    assert (
        code_of(make_facts((make_grant(),), standing=standing), "gpt-5.6-sol") == "misuse_cooldown"
    )


# --------------------------------------------------------------------------- ga and unlisted


def test_ga_needs_no_grant_and_ignores_grants() -> None:
    assert code_of(make_facts(), "gpt-5-mini", "api") is None
    revoked = make_grant(MAIN, "api", revoked=True, approvals=(("provider", "alice"),))
    decision = ask(make_facts((revoked,)), "gpt-5-mini", "api")
    assert decision.allowed and decision.rule == "phase.ga" and decision.grant is None
    # The same program in preview on another product still needs its grant.
    assert code_of(make_facts(), "gpt-5-mini", "codex") == "model_not_found"


def test_ga_still_honours_workspace_suspension_and_cooldown() -> None:
    assert code_of(make_facts(ws_suspended=True), "gpt-5-mini") == "workspace_suspended"
    assert code_of(make_facts(standing=STANDINGS["cooldown"]), "gpt-5-mini") == "misuse_cooldown"


def test_unlisted_models_follow_the_config() -> None:
    allowed = ask(make_facts(), UNLISTED_MODEL, cfg=ALLOW_UNLISTED)
    assert allowed.allowed and allowed.rule == "model.unlisted" and allowed.program is None
    denied = ask(make_facts(), UNLISTED_MODEL, cfg=DENY_UNLISTED)
    assert (denied.code, denied.rule) == ("model_not_found", "model.unlisted")
    # Models of a program are not affected by the unlisted policy.
    assert code_of(make_facts((make_grant(),)), "gpt-5.6-sol", cfg=DENY_UNLISTED) is None


def test_a_request_without_a_model_skips_the_program_checks() -> None:
    decision = ask(make_facts(), None, "chatgpt")
    assert decision.allowed and decision.rule == "request.no_model"
    assert decision.blocked_categories == frozenset()


# --------------------------------------------------------------------------- grant_state


REQUIRED = ("provider", "government")


@pytest.mark.parametrize(
    ("grant", "now", "state"),
    [
        (make_grant(approvals=(), enable_at=None), NOW, GrantState.REQUESTED),
        (make_grant(approvals=(("observer", "carol"),), enable_at=None), NOW, GrantState.REQUESTED),
        (make_grant(approvals=(("provider", "alice"),)), NOW, GrantState.PENDING_REVIEW),
        (
            make_grant(approvals=(("provider", "alice"), ("government", "alice"))),
            NOW,
            GrantState.PENDING_REVIEW,
        ),
        (make_grant(enable_at=None), NOW, GrantState.APPROVED),
        (make_grant(enable_at=NOW + 60), NOW, GrantState.APPROVED),
        (make_grant(enable_at=NOW + 60), NOW + 60, GrantState.ENABLED),
        (make_grant(), NOW, GrantState.ENABLED),
        (make_grant(suspended=True), NOW, GrantState.SUSPENDED),
        # The state follows the decision's order: approvals (row 7) before suspension (row 9).
        (make_grant(suspended=True, approvals=()), NOW, GrantState.REQUESTED),
        (make_grant(expires_at=NOW + 60), NOW, GrantState.ENABLED),
        (make_grant(expires_at=NOW + 60), NOW + 60, GrantState.EXPIRED),
        (make_grant(expires_at=NOW - 1, suspended=True), NOW, GrantState.SUSPENDED),
        (make_grant(expires_at=NOW - 1, enable_at=None), NOW, GrantState.APPROVED),
        (make_grant(revoked=True), NOW, GrantState.REVOKED),
        (make_grant(revoked=True, suspended=True, expires_at=NOW - 1), NOW, GrantState.REVOKED),
    ],
)
def test_grant_state(grant: Grant, now: float, state: GrantState) -> None:
    assert grant_state(grant, REQUIRED, now) == state


def test_enable_at_may_be_set_before_approval() -> None:
    grant = make_grant(approvals=(("provider", "alice"),), enable_at=NOW - 60)
    assert grant_state(grant, REQUIRED, NOW) == GrantState.PENDING_REVIEW
    signed = replace(grant, approvals=(*grant.approvals, Approval("government", "bob", NOW)))
    assert grant_state(signed, REQUIRED, NOW) == GrantState.ENABLED


@settings(max_examples=200, deadline=None)
@given(grant_specs(PREVIEW), st.sampled_from((NOW - HOUR, NOW, NOW + HOUR)))
def test_grant_state_is_derived_from_the_facts_and_the_clock(spec: GrantSpec, now: float) -> None:
    grant = to_grant((PREVIEW, "api"), spec, "workspace:ws1")
    signed = {role: who for role, who in spec.approvals if role in REQUIRED}
    # Distinct reviewers: each reviewer signs at most one role.
    signed_roles = len(set(signed.values()))
    if spec.revoked:
        expected = GrantState.REVOKED
    elif signed_roles == 0:
        expected = GrantState.REQUESTED
    elif signed_roles < len(REQUIRED):
        expected = GrantState.PENDING_REVIEW
    elif spec.enable_at is None or spec.enable_at > now:
        expected = GrantState.APPROVED
    elif spec.suspended:
        expected = GrantState.SUSPENDED
    elif spec.expires_at is not None and spec.expires_at <= now:
        expected = GrantState.EXPIRED
    else:
        expected = GrantState.ENABLED
    assert grant_state(grant, REQUIRED, now) == expected


@settings(max_examples=300, deadline=None)
@given(
    grant_specs(PREVIEW),
    st.sampled_from(PROGRAMS[PREVIEW][0]),
    st.sampled_from((NOW - HOUR, NOW, NOW + HOUR)),
)
def test_the_grant_state_is_what_the_decision_answers(
    spec: GrantSpec, model: str, now: float
) -> None:
    """One ordering: a grant's state names the answer a request under it gets."""
    grant = to_grant((PREVIEW, "api"), spec, "workspace:ws1")
    state = grant_state(grant, REQUIRED, now)
    decision = ask(make_facts((grant,)), model, now=now)
    if state is not GrantState.REVOKED and not grant.covers_model(model):
        assert (decision.code, decision.rule) == ("model_not_found", "grant.model_subset")
    else:
        assert (decision.code, decision.rule) == ANSWER[state]
