"""Misuse standing (SPEC §6): the windowed score, the tier ladder, cooldown blocks, recorded
suspensions, shadow tiers, and what decide() makes of them (SPEC §3.4 rows 3, 10, 11, 12)."""

from __future__ import annotations

import math

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
    Org,
    RequestInfo,
    Standing,
    StandingView,
    Workspace,
    decide,
    evaluate_standing,
)
from proxy.policy.standing import reaches_suspension, score_at, tier_for_score

WINDOW = 1000.0
BLOCK = 100.0
T = 1_750_000_000.0

BASE_YAML = f"""
upstreams:
  models: {{url: "http://127.0.0.1:8089"}}
routes:
  - {{path_prefix: /v1/, product: api, upstream: models}}
programs:
  gpt-5.6-preview:
    models: [gpt-5.6-sol]
    required_approvals: [provider]
    phases: {{api: preview}}
  gpt-5-bio:
    models: [gpt-5-bio]
    phases: {{api: ga}}
    blocked_categories: [bio]
rate_limits:
  default: {{requests_per_minute: 600, burst: 60, concurrent: 50}}
  programs: {{gpt-5.6-preview: {{requests_per_minute: 120, burst: 20, concurrent: 10}}}}
misuse:
  window_seconds: {WINDOW}
  tiers:
    - {{name: watch, min_score: 1}}
    - {{name: restricted, min_score: 3, rate_limit_factor: 0.2, blocked_categories: [cyber]}}
    - {{name: cooldown, min_score: 5, block_seconds: {BLOCK}}}
    - {{name: suspended, min_score: 8}}
"""
CFG = config.parse(BASE_YAML)
MISUSE = CFG.misuse

SHADOW_STRICT = config.parse(
    BASE_YAML.replace(
        "    - {name: restricted,",
        "    - {name: strict, min_score: 2, rate_limit_factor: 0.5, shadow: true}\n"
        "    - {name: restricted,",
    )
)
SHADOW_COOLDOWN = config.parse(
    BASE_YAML.replace(
        f"{{name: cooldown, min_score: 5, block_seconds: {BLOCK}}}",
        f"{{name: cooldown, min_score: 5, block_seconds: {BLOCK}, shadow: true}}",
    )
)


def flag(at: float, severity: int, category: str = "cyber") -> Flag:
    return Flag(at, category, severity, "analyst")


def standing(*flags: Flag, suspended: bool = False) -> Standing:
    return Standing(tuple(sorted(flags, key=lambda f: f.at)), suspended=suspended)


def recorded_as_add_flag_would(s: Standing, now: float = T) -> Standing:
    """The standing with the suspension ``Writes.add_flag`` records when a flag reaches it."""
    return Standing(s.flags, suspended=s.suspended or reaches_suspension(s, MISUSE, now))


def view(s: Standing, now: float, cfg: Config = CFG) -> StandingView:
    return evaluate_standing(s, cfg.misuse, now)


GRANT = Grant(
    grant_id="gr_1",
    program="gpt-5.6-preview",
    product="api",
    subject="workspace:ws1",
    models=None,
    created_at=T - 10 * WINDOW,
    approvals=(Approval("provider", "alice", T - 10 * WINDOW),),
    enable_at=T - 10 * WINDOW,
)


def ask(s: Standing, now: float, model: str | None = "gpt-5.6-sol", cfg: Config = CFG) -> Decision:
    facts = Facts(
        Workspace("ws1", "org1"),
        Org("org1"),
        workspace_grants={("gpt-5.6-preview", "api"): GRANT},
        standing=s,
    )
    return decide(facts, cfg, RequestInfo("api", model), now)


# --------------------------------------------------------------------------- the score


def test_score_sums_the_severities_inside_the_sliding_window() -> None:
    flags = (
        flag(T - WINDOW, 4),  # exactly one window old: out
        flag(T - WINDOW + 1, 1),
        flag(T - 10, 2),
        flag(T + 5, 7),  # not yet happened at T
    )
    assert score_at(flags, WINDOW, T) == 3
    assert view(standing(*flags), T).score == 3
    # The window slides: at T + 5 the flag of T - WINDOW + 1 is out and the later one is in.
    assert score_at(flags, WINDOW, T + 5) == 9
    # At T + WINDOW - 10 only the last two remain.
    assert score_at(flags, WINDOW, T + WINDOW - 10) == 7


def test_flags_that_age_out_lower_the_tier() -> None:
    s = standing(flag(T, 3))
    assert view(s, T).tier_name == "restricted"
    assert view(s, T + WINDOW - 0.001).tier_name == "restricted"
    aged = view(s, T + WINDOW)
    assert (aged.score, aged.tier_name, aged.tier) == (0, "normal", None)


def test_no_flags_is_normal() -> None:
    assert view(Standing(), T) == StandingView(0, None, None, False, None)
    assert evaluate_standing(None, MISUSE, T).tier_name == "normal"


# --------------------------------------------------------------------------- the ladder


@pytest.mark.parametrize(
    ("score", "tier"),
    [
        (0, "normal"),
        (1, "watch"),
        (2, "watch"),
        (3, "restricted"),
        (4, "restricted"),
        (5, "cooldown"),
        (7, "cooldown"),
        (8, "suspended"),
        (30, "suspended"),
    ],
)
def test_tier_ladder(score: int, tier: str) -> None:
    chosen = tier_for_score(MISUSE.tiers, score)
    assert (chosen.name if chosen is not None else "normal") == tier
    # The same score built from several flags lands in the same tier.
    flags = [flag(T - i, 1) for i in range(score)]
    v = view(recorded_as_add_flag_would(standing(*flags)), T)
    assert (v.score, v.tier_name) == (score, tier)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 3 * WINDOW), st.integers(1, 4)), max_size=8))
def test_score_and_tier_follow_the_flags(raw: list[tuple[float, int]]) -> None:
    now = T + 3 * WINDOW
    flags = [flag(T + offset, severity) for offset, severity in raw]
    expected = sum(f.severity for f in flags if now - WINDOW < f.at <= now)
    v = view(recorded_as_add_flag_would(standing(*flags), now), now)
    assert v.score == expected
    if expected >= 8:
        assert v.suspended and v.tier_name == "suspended"
    elif expected >= 5:
        # At or above cooldown: blocked, or once the block is over handled as restricted.
        assert v.tier is not None and v.tier.name in ("cooldown", "restricted")
        assert (v.tier.name == "cooldown") is (v.cooldown_until is not None)
    else:
        names = {0: "normal", 1: "watch", 2: "watch", 3: "restricted", 4: "restricted"}
        assert v.tier_name == names[expected] and v.cooldown_until is None


# --------------------------------------------------------------------------- cooldown


def test_cooldown_blocks_for_block_seconds_then_handled_as_the_tier_below() -> None:
    s = standing(flag(T, 5))
    during = view(s, T)
    assert during.tier is not None and during.tier.name == "cooldown"
    assert during.cooldown_until == T + BLOCK
    assert view(s, T + BLOCK - 0.001).cooldown_until == T + BLOCK
    after = view(s, T + BLOCK)
    assert after.cooldown_until is None
    assert after.tier is not None and after.tier.name == "restricted"
    assert after.score == 5


def test_decide_refuses_during_cooldown_with_retry_after() -> None:
    s = standing(flag(T, 5))
    decision = ask(s, T + 10)
    assert (decision.code, decision.rule) == ("misuse_cooldown", "misuse.cooldown")
    assert decision.retry_after == BLOCK - 10
    # A fraction of a second left still asks the client to wait a whole second.
    assert ask(s, T + BLOCK - 0.25).retry_after == 1.0
    assert ask(s, T + BLOCK - 1.5).retry_after == 2.0
    # Requests that name no model are refused too.
    assert ask(s, T + 10, model=None).code == "misuse_cooldown"
    # Once the block is over the workspace is handled as restricted.
    after = ask(s, T + BLOCK)
    assert after.allowed
    assert after.blocked_categories == frozenset({"cyber"})
    assert after.rate_limit is not None and after.rate_limit.requests_per_minute == 24


def test_a_new_flag_at_or_above_the_threshold_starts_a_new_block() -> None:
    first = flag(T, 5)
    assert view(standing(first), T + 2 * BLOCK).cooldown_until is None
    again = standing(first, flag(T + 2 * BLOCK, 1))
    v = view(again, T + 2 * BLOCK)
    assert (v.score, v.cooldown_until) == (6, T + 3 * BLOCK)
    assert ask(again, T + 2 * BLOCK + 1).code == "misuse_cooldown"
    assert view(again, T + 3 * BLOCK).cooldown_until is None


def test_a_new_flag_during_a_block_extends_it() -> None:
    s = standing(flag(T, 5), flag(T + BLOCK / 2, 1))
    assert view(s, T + BLOCK).cooldown_until == T + 1.5 * BLOCK


def test_a_flag_below_the_threshold_starts_no_block() -> None:
    # The score reached 5 once, aged down to 3, and a new flag brings it to 4: no block.
    s = standing(flag(T, 2), flag(T + 0.5 * WINDOW, 3), flag(T + WINDOW + 1, 1))
    v = view(s, T + WINDOW + 1)
    assert (v.score, v.cooldown_until) == (4, None)
    assert v.tier is not None and v.tier.name == "restricted"


def test_a_block_whose_flags_aged_out_stays_over() -> None:
    s = standing(flag(T, 5))
    v = view(s, T + WINDOW)
    assert (v.score, v.tier_name, v.cooldown_until) == (0, "normal", None)


# --------------------------------------------------------------------------- suspension


def test_a_suspending_score_suspends() -> None:
    s = standing(flag(T, 8))
    assert reaches_suspension(s, MISUSE, T)
    s = recorded_as_add_flag_would(s)
    v = view(s, T)
    assert v.suspended and v.tier_name == "suspended"
    decision = ask(s, T)
    assert (decision.code, decision.rule) == ("workspace_suspended", "misuse.suspended")


def test_a_reinstated_workspace_is_handled_as_the_tier_below_suspension() -> None:
    # An operator's reinstate clears the recorded suspension even while the score is high.
    high = standing(flag(T, 5), flag(T + 1, 3))  # score 8, suspension not recorded
    later = T + 1 + 2 * BLOCK  # the cooldown block is over, the flags still count
    v = view(high, later)
    assert (v.score, v.suspended, v.tier_name) == (8, False, "restricted")
    assert ask(high, later).code is None


def test_a_recorded_suspension_does_not_lift_when_flags_age_out() -> None:
    recorded = standing(flag(T, 8), suspended=True)
    later = T + 5 * WINDOW
    v = view(recorded, later)
    assert (v.score, v.suspended, v.tier_name) == (0, True, "suspended")
    assert ask(recorded, later).code == "workspace_suspended"
    # The score alone never suspends: only the recorded fact does.
    assert not view(standing(flag(T, 8)), later).suspended
    assert not view(standing(flag(T, 8)), T).suspended


def test_clearing_the_flags_does_not_lift_a_recorded_suspension() -> None:
    cleared = Standing((), suspended=True, suspended_at=T)
    v = view(cleared, T + 1)
    assert (v.score, v.suspended) == (0, True)
    assert ask(cleared, T + 1, model=None).code == "workspace_suspended"


def test_suspension_answers_before_cooldown() -> None:
    s = standing(flag(T, 5), suspended=True)
    assert ask(s, T + 1).code == "workspace_suspended"


# --------------------------------------------------------------------------- shadow tiers


def test_a_shadow_tier_is_reported_but_not_enforced() -> None:
    s = standing(flag(T, 2))
    v = view(s, T, SHADOW_STRICT)
    assert v.tier is not None and v.tier.name == "watch"
    assert v.shadow_tier is not None and v.shadow_tier.name == "strict"
    decision = ask(s, T, cfg=SHADOW_STRICT)
    assert decision.allowed
    assert decision.shadow_rules == ("tier:strict",)
    # Enforced limits stay those of watch (factor 1), not the shadow's 0.5.
    assert decision.rate_limit is not None and decision.rate_limit.requests_per_minute == 120


def test_a_shadow_tier_below_the_enforced_one_is_not_reported() -> None:
    v = view(standing(flag(T, 3)), T, SHADOW_STRICT)
    assert v.tier is not None and v.tier.name == "restricted"
    assert v.shadow_tier is None
    assert ask(standing(flag(T, 3)), T, cfg=SHADOW_STRICT).shadow_rules == ()


def test_a_shadow_cooldown_blocks_nobody() -> None:
    s = standing(flag(T, 5))
    v = view(s, T, SHADOW_COOLDOWN)
    assert v.cooldown_until is None
    assert v.tier is not None and v.tier.name == "restricted"
    assert v.shadow_tier is not None and v.shadow_tier.name == "cooldown"
    decision = ask(s, T, cfg=SHADOW_COOLDOWN)
    assert decision.allowed and decision.shadow_rules == ("tier:cooldown",)


# --------------------------------------------------------------------------- rows 11 and 12 inputs


@pytest.mark.parametrize(
    ("score", "model", "factor", "categories"),
    [
        (0, "gpt-5.6-sol", 1.0, set()),
        (1, "gpt-5.6-sol", 1.0, set()),
        (3, "gpt-5.6-sol", 0.2, {"cyber"}),
        (3, "gpt-5-bio", 0.2, {"cyber", "bio"}),
        (0, "gpt-5-bio", 1.0, {"bio"}),
        (3, "some-unlisted-model", 0.2, {"cyber"}),
        (3, None, 0.2, set()),
    ],
)
def test_the_tier_scales_the_rate_limit_and_names_the_blocked_categories(
    score: int, model: str | None, factor: float, categories: set[str]
) -> None:
    s = standing(*(flag(T - i, 1) for i in range(score)))
    decision = ask(s, T, model=model)
    assert decision.allowed
    assert decision.blocked_categories == frozenset(categories)
    program = "gpt-5.6-preview" if model == "gpt-5.6-sol" else None
    base = CFG.rate_limits.for_program(program)
    limit = decision.rate_limit
    assert limit is not None
    assert limit.requests_per_minute == max(1, math.floor(base.requests_per_minute * factor))
    assert limit.burst == math.floor(base.burst * factor)
    assert limit.concurrent == max(1, math.floor(base.concurrent * factor))


def test_restricted_preview_limits_are_scaled_by_the_tier_factor() -> None:
    decision = ask(standing(flag(T, 3)), T)
    limit = decision.rate_limit
    assert limit is not None
    assert (limit.requests_per_minute, limit.burst, limit.concurrent) == (24, 4, 2)
    normal = ask(Standing(), T).rate_limit
    assert normal is not None
    assert (normal.requests_per_minute, normal.burst, normal.concurrent) == (120, 20, 10)
