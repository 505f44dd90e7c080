"""The facts a decision is made from: plain values read from the store, never I/O handles."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from proxy.policy.grants import Grant
from proxy.policy.standing import Standing

# Grants of one subject, by (program, product).
GrantMap = Mapping[tuple[str, str], Grant]
NO_GRANTS: GrantMap = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Org:
    org_id: str
    name: str = ""
    suspended: bool = False
    account_representative: str | None = None  # eligibility for programs that require one (§4)


@dataclass(frozen=True, slots=True)
class Workspace:
    workspace_id: str
    org_id: str
    name: str = ""
    suspended: bool = False  # by an operator


@dataclass(frozen=True, slots=True)
class Facts:
    workspace: Workspace
    org: Org | None
    workspace_grants: GrantMap = field(default_factory=lambda: NO_GRANTS)
    org_grants: GrantMap = field(default_factory=lambda: NO_GRANTS)
    standing: Standing = field(default_factory=Standing)

    def grant_for(self, program: str, product: str) -> Grant | None:
        """The deciding grant: a workspace grant wins over an org grant, whatever its state."""
        key = (program, product)
        grant = self.workspace_grants.get(key)
        return grant if grant is not None else self.org_grants.get(key)
