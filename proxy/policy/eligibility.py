"""Who may be granted a program at all (SPEC §4): eligibility by account representative.

Pure: the org is an argument. Eligibility is checked when a grant is requested, not on each
request: a grant outlives a representative cleared later. (The other §4 gate, a program's
``release_gates.ga_not_before``, is a config rule: ``proxy.config`` refuses an early ``ga``.)
"""

from __future__ import annotations

from proxy.policy.facts import Org


def org_eligible(requires_account_representative: bool, org: Org | None) -> bool:
    """Whether a grant may be requested for ``org`` (or a workspace of it)."""
    if not requires_account_representative:
        return True
    return org is not None and bool(org.account_representative)
