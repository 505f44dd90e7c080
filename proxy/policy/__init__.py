"""The decision, pure: facts + config snapshot + time in, a Decision out. No I/O, no clock reads."""

from proxy.policy.decide import Decision, RequestInfo, decide, decide_models
from proxy.policy.facts import Facts, Org, Workspace
from proxy.policy.grants import Approval, Grant, GrantState, grant_state, missing_approvals
from proxy.policy.standing import Flag, Standing, StandingView, evaluate_standing

__all__ = [
    "Approval",
    "Decision",
    "Facts",
    "Flag",
    "Grant",
    "GrantState",
    "Org",
    "RequestInfo",
    "Standing",
    "StandingView",
    "Workspace",
    "decide",
    "decide_models",
    "evaluate_standing",
    "grant_state",
    "missing_approvals",
]
