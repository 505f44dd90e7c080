"""Grants and their derived state (SPEC §4).

State is never stored: it is derived from the recorded facts (approvals, enable_at, expires_at,
suspended, revoked) and the clock, so a grant's effect changes at enable_at/expires_at with no
write.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from proxy.modelnames import covered_by


class GrantState(enum.StrEnum):
    REQUESTED = "requested"
    PENDING_REVIEW = "pending_review"
    APPROVED = "approved"
    ENABLED = "enabled"
    SUSPENDED = "suspended"
    REVOKED = "revoked"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Approval:
    role: str
    reviewer: str
    at: float
    token: str = ""  # the admin token that signed, so one token cannot sign two roles


@dataclass(frozen=True, slots=True)
class Grant:
    grant_id: str
    program: str
    product: str
    subject: str  # "org:<id>" or "workspace:<id>"
    models: tuple[str, ...] | None  # None: every model of the program
    created_at: float
    approvals: tuple[Approval, ...] = ()
    enable_at: float | None = None
    expires_at: float | None = None
    suspended: bool = False
    revoked: bool = False

    def covers_model(self, model: str) -> bool:
        """Whether the grant's model subset holds ``model`` (by the program's name rules)."""
        return self.models is None or covered_by(self.models, model)


def missing_approvals(grant: Grant, required: tuple[str, ...]) -> tuple[str, ...]:
    """Required roles not yet signed, counting each reviewer once (distinct reviewers)."""
    used: set[str] = set()
    signed: set[str] = set()
    for a in grant.approvals:
        if a.role in required and a.role not in signed and a.reviewer not in used:
            signed.add(a.role)
            used.add(a.reviewer)
    return tuple(r for r in required if r not in signed)


def is_enabled_at(grant: Grant, now: float) -> bool:
    return grant.enable_at is not None and grant.enable_at <= now


def is_expired_at(grant: Grant, now: float) -> bool:
    return grant.expires_at is not None and grant.expires_at <= now


def grant_state(grant: Grant, required: tuple[str, ...], now: float) -> GrantState:
    """The grant's state: the first of the decision's grant checks (SPEC §3.4 rows 6–9, in that
    order) that holds, so the state shown and the answer a request gets never disagree."""
    if grant.revoked:
        return GrantState.REVOKED
    missing = missing_approvals(grant, required)
    if missing:
        return GrantState.PENDING_REVIEW if len(missing) < len(required) else GrantState.REQUESTED
    if not is_enabled_at(grant, now):
        return GrantState.APPROVED
    if grant.suspended:
        return GrantState.SUSPENDED
    if is_expired_at(grant, now):
        return GrantState.EXPIRED
    return GrantState.ENABLED


# What a request under a grant in each state is answered (None: the grant lets it through), and
# the rule ``explain`` names for it.
ANSWER: Mapping[GrantState, tuple[str | None, str]] = MappingProxyType(
    {
        GrantState.REVOKED: ("model_not_found", "grant.revoked"),
        GrantState.REQUESTED: ("access_pending_review", "grant.pending_review"),
        GrantState.PENDING_REVIEW: ("access_pending_review", "grant.pending_review"),
        GrantState.APPROVED: ("access_not_yet_enabled", "grant.not_yet_enabled"),
        GrantState.SUSPENDED: ("access_suspended", "grant.suspended"),
        GrantState.EXPIRED: ("access_expired", "grant.expired"),
        GrantState.ENABLED: (None, "grant.enabled"),
    }
)
