"""Grants and their derived state (SPEC §4).

State is never stored: it is derived from the recorded facts (approvals, enable_at, expires_at,
suspended, revoked) and the clock, so a grant's effect changes at enable_at/expires_at with no
write.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

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


def is_approved(grant: Grant, required: tuple[str, ...]) -> bool:
    return not missing_approvals(grant, required)


def is_enabled_at(grant: Grant, now: float) -> bool:
    return grant.enable_at is not None and grant.enable_at <= now


def is_expired_at(grant: Grant, now: float) -> bool:
    return grant.expires_at is not None and grant.expires_at <= now


def grant_state(grant: Grant, required: tuple[str, ...], now: float) -> GrantState:
    if grant.revoked:
        return GrantState.REVOKED
    if is_expired_at(grant, now):
        return GrantState.EXPIRED
    if grant.suspended:
        return GrantState.SUSPENDED
    missing = missing_approvals(grant, required)
    if missing:
        return GrantState.PENDING_REVIEW if len(missing) < len(required) else GrantState.REQUESTED
    return GrantState.ENABLED if is_enabled_at(grant, now) else GrantState.APPROVED
