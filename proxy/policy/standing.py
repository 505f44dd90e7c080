"""Misuse standing (SPEC §6): flags in a sliding window add up to a score; the score picks a tier.

Cooldown is derived from the flags and the clock: a flag that brings the windowed score to a
cooldown tier's threshold starts a block of ``block_seconds``; once the block is over the
workspace is handled as the highest tier below the cooldown until its score changes. A misuse
suspension is a recorded fact (``Standing.suspended``, written when a flag brings the score to a
suspending tier), so it does not lift when flags age out, and an operator's reinstate lifts it
even while the score is still high (the next flag then suspends again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.config import MisuseConfig, Tier


@dataclass(frozen=True, slots=True)
class Flag:
    at: float
    category: str
    severity: int
    source: str
    note: str | None = None


@dataclass(frozen=True, slots=True)
class Standing:
    flags: tuple[Flag, ...] = ()  # sorted by time
    suspended: bool = False  # misuse suspension, lifted only by an operator's reinstate
    suspended_at: float | None = None


@dataclass(frozen=True, slots=True)
class StandingView:
    score: int
    tier: Tier | None  # the tier enforced now; None is "normal"
    cooldown_until: float | None
    suspended: bool
    shadow_tier: Tier | None  # a stricter shadow tier that would apply, for counting only

    @property
    def tier_name(self) -> str:
        if self.suspended:
            return "suspended"
        return self.tier.name if self.tier is not None else "normal"


NORMAL = StandingView(0, None, None, False, None)


def score_at(flags: tuple[Flag, ...], window: float, t: float) -> int:
    return sum(f.severity for f in flags if t - window < f.at <= t)


def tier_for_score(tiers: tuple[Tier, ...], score: int) -> Tier | None:
    chosen: Tier | None = None
    for tier in tiers:
        if tier.min_score <= score:
            chosen = tier
    return chosen


def _block_until(flags: tuple[Flag, ...], window: float, tier: Tier) -> float | None:
    assert tier.block_seconds is not None
    until: float | None = None
    for f in flags:
        if score_at(flags, window, f.at) >= tier.min_score:
            until = f.at + tier.block_seconds
    return until


def _effective(
    tiers: tuple[Tier, ...], flags: tuple[Flag, ...], window: float, score: int, now: float
) -> tuple[Tier | None, float | None]:
    """The tier that applies now among ``tiers``, and the end of an active cooldown block.

    A suspending tier is only ever applied through the recorded suspension, so here it (like a
    cooldown whose block is over) gives way to the highest tier below it.
    """
    tier = tier_for_score(tiers, score)
    while tier is not None and (tier.block_seconds is not None or tier.suspend):
        if tier.block_seconds is not None:
            until = _block_until(flags, window, tier)
            if until is not None and now < until:
                return tier, until
        tier = tier_for_score(tuple(t for t in tiers if t.min_score < tier.min_score), score)
    return tier, None


def reaches_suspension(standing: Standing, cfg: MisuseConfig, now: float) -> bool:
    """Whether the windowed score reaches an enforced suspending tier (to record a suspension)."""
    score = score_at(standing.flags, cfg.window_seconds, now)
    tier = tier_for_score(tuple(t for t in cfg.tiers if not t.shadow), score)
    return tier is not None and tier.suspend


def evaluate_standing(standing: Standing | None, cfg: MisuseConfig, now: float) -> StandingView:
    if standing is None or (not standing.flags and not standing.suspended):
        return NORMAL
    window = cfg.window_seconds
    score = score_at(standing.flags, window, now)
    enforced_tiers = tuple(t for t in cfg.tiers if not t.shadow)
    tier, until = _effective(enforced_tiers, standing.flags, window, score, now)
    suspended = standing.suspended
    shadow: Tier | None = None
    if len(enforced_tiers) != len(cfg.tiers):
        would, _ = _effective(cfg.tiers, standing.flags, window, score, now)
        raw = tier_for_score(cfg.tiers, score)
        if raw is not None and raw.shadow and raw.suspend:
            would = raw
        if would is not None and would.shadow:
            shadow = would
    return StandingView(score, tier, until, suspended, shadow)


def describe(
    view: StandingView,
    standing: Standing | None = None,
    *,
    window: float = 0.0,
    now: float = 0.0,
    time: Callable[[float], Any] = float,
) -> dict[str, Any]:
    """The one rendering of a standing: score, tier, cooldown end and suspension; with the
    ``standing`` it came from, also when it was suspended, the shadow tier and the flags inside
    the window. ``time`` renders an instant (RFC 3339 for the admin API, epoch for the audit)."""
    out: dict[str, Any] = {
        "score": view.score,
        "tier": view.tier_name,
        "until": time(view.cooldown_until) if view.cooldown_until is not None else None,
        "suspended": view.suspended,
    }
    if standing is None:
        return out
    out["suspended_at"] = (
        time(standing.suspended_at)
        if standing.suspended and standing.suspended_at is not None
        else None
    )
    out["shadow_tier"] = view.shadow_tier.name if view.shadow_tier is not None else None
    out["flags"] = [
        {
            "at": time(f.at),
            "expires_at": time(f.at + window),
            "category": f.category,
            "severity": f.severity,
            "source": f.source,
            "note": f.note,
        }
        for f in standing.flags
        if now - window < f.at <= now
    ]
    return out
