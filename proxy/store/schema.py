"""Redis key names and the (de)serialization of facts. One place, so the layout cannot drift.

Every key carries a hash tag (the part in braces), so the keys that one script or transaction
touches share one Redis Cluster slot:

- ``{ap}`` the audited admin state, one slot for all of it, so a change and its entry in the one
  hash-chained audit log commit in the same MULTI/EXEC on every topology:
  ``ap:{ap}:apikey:<key_id>`` hash (workspace_id, digest, pepper_version, name, created_at,
  revoked_at); ``ap:{ap}:ws:<ws>`` hash (org_id, name, suspended, reason, created_at);
  ``ap:{ap}:org:<org>`` hash (name, suspended, reason, created_at, account_representative);
  ``ap:{ap}:grant:<grant_id>`` the grant as JSON (every grant ever made);
  ``ap:{ap}:sgrants:<subject>`` hash ``<program>|<product>`` -> the subject's current grant;
  ``ap:{ap}:standing:<ws>`` hash (suspended, suspended_at); ``ap:{ap}:flags:<ws>`` sorted set of
  flags (score: time); ``ap:{ap}:orgws:<org>`` set; ``ap:{ap}:audit`` list of JSON entries and
  ``ap:{ap}:audit:head`` hash (seq, hash); ``ap:{ap}:replicas`` live replicas (rate limits);
  ``ap:{ap}:schema`` the layout version; ``ap:{ap}:batchfile:<file_id>`` hash (models as a JSON
  list, workspace, at): the models the lines of a batch input file name, recorded at upload
  (``batchfiles.py``).
- ``{ws:<ws>}`` one workspace's traffic state, spread over the cluster by workspace:
  ``ap:{ws:<ws>}:rl:<program>`` GCRA bucket, ``ap:{ws:<ws>}:cc:<program>`` concurrency slots
  (``ratelimit.py``), ``ap:{ws:<ws>}:tk:<program>`` tokens spent against ``tokens_per_minute``
  (``ratelimit.lua``), ``ap:{ws:<ws>}:usage`` usage and cost counters and
  ``ap:{ws:<ws>}:usage-day:<YYYY-MM-DD>`` the same for one UTC day, expiring after the configured
  retention (``usage.py``).
Keys of the admin tag are read and written through the admin client (``topology.Topology.client``),
keys of a workspace tag through the data client (``data_client``) or the rate limiter's.

Entitlement reads are cached (SPEC §5), so the admin slot sees writes and cache misses only; the
per-request traffic (rate limits, usage) goes to the workspace's own slot.
Cache keys (also the invalidation messages): ``key:{id}``, ``ws:{id}``, ``org:{id}``,
``grants:{subject}``, ``standing:{ws}``, and ``*`` for everything.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.policy.facts import GrantMap, Org, Workspace
from proxy.policy.grants import Approval, Grant
from proxy.policy.standing import Flag, Standing

RawHash = Mapping[Any, Any]  # a hash as redis-py returns it (bytes keys and values)

PREFIX = "ap:"
ADMIN = "ap:{ap}:"  # the admin slot's hash tag
INVALIDATION_CHANNEL = "ap:invalidate"
RELOAD_CHANNEL = "ap:reload"
AUDIT_LIST = ADMIN + "audit"
AUDIT_HEAD = ADMIN + "audit:head"
REPLICAS_KEY = ADMIN + "replicas"
SCHEMA_KEY = ADMIN + "schema"
SCHEMA_VERSION = 2  # 1: the untagged layout of single-node releases (see migrate.py)
GRANT_PATTERN = ADMIN + "grant:*"
FLUSH_ALL = "*"


def apikey_key(key_id: str) -> str:
    return f"{ADMIN}apikey:{key_id}"


def workspace_key(ws: str) -> str:
    return f"{ADMIN}ws:{ws}"


def org_key(org: str) -> str:
    return f"{ADMIN}org:{org}"


def grant_key(grant_id: str) -> str:
    return f"{ADMIN}grant:{grant_id}"


def subject_grants_key(subject: str) -> str:
    return f"{ADMIN}sgrants:{subject}"


def standing_key(ws: str) -> str:
    return f"{ADMIN}standing:{ws}"


def flags_key(ws: str) -> str:
    return f"{ADMIN}flags:{ws}"


def org_workspaces_key(org: str) -> str:
    return f"{ADMIN}orgws:{org}"


def workspace_tag(ws: str) -> str:
    """The hash tag of one workspace's traffic keys: all of them share its Cluster slot."""
    return f"ap:{{ws:{ws}}}:"


def rate_key(ws: str, program: str | None) -> str:
    return f"{workspace_tag(ws)}rl:{program or '-'}"


def concurrency_key(ws: str, program: str | None) -> str:
    return f"{workspace_tag(ws)}cc:{program or '-'}"


def batch_file_key(file_id: str) -> str:
    return f"{ADMIN}batchfile:{file_id}"


def usage_key(ws: str) -> str:
    return f"{workspace_tag(ws)}usage"


def usage_day_key(ws: str, day: str) -> str:
    """Usage of one UTC day; ``day`` is ``YYYY-MM-DD`` (fixed length, so never ambiguous)."""
    return f"{workspace_tag(ws)}usage-day:{day}"


def token_key(ws: str, program: str | None) -> str:
    """The token bucket of a workspace and program (a GCRA arrival time, as the rate key)."""
    return f"{workspace_tag(ws)}tk:{program or '-'}"


def grant_slot(program: str, product: str) -> str:
    return f"{program}|{product}"


# Cache keys.
def c_key(key_id: str) -> str:
    return f"key:{key_id}"


def c_ws(ws: str) -> str:
    return f"ws:{ws}"


def c_org(org: str) -> str:
    return f"org:{org}"


def c_grants(subject: str) -> str:
    return f"grants:{subject}"


def c_standing(ws: str) -> str:
    return f"standing:{ws}"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    workspace_id: str
    digest: bytes
    pepper_version: str
    revoked: bool
    name: str = ""
    created_at: float = 0.0


def _s(raw: RawHash, field: str, default: str = "") -> str:
    value = raw.get(field.encode())
    return value.decode() if value is not None else default


def key_from_hash(key_id: str, raw: RawHash) -> KeyRecord | None:
    if not raw:
        return None
    return KeyRecord(
        key_id=key_id,
        workspace_id=_s(raw, "workspace_id"),
        digest=bytes.fromhex(_s(raw, "digest")),
        pepper_version=_s(raw, "pepper_version"),
        revoked=bool(_s(raw, "revoked_at")),
        name=_s(raw, "name"),
        created_at=float(_s(raw, "created_at", "0")),
    )


def workspace_from_hash(ws: str, raw: RawHash) -> Workspace | None:
    if not raw:
        return None
    return Workspace(
        workspace_id=ws,
        org_id=_s(raw, "org_id"),
        name=_s(raw, "name"),
        suspended=_s(raw, "suspended") == "1",
    )


def org_from_hash(org: str, raw: RawHash) -> Org | None:
    if not raw:
        return None
    return Org(
        org_id=org,
        name=_s(raw, "name"),
        suspended=_s(raw, "suspended") == "1",
        account_representative=_s(raw, "account_representative") or None,
    )


def grant_to_dict(g: Grant) -> dict[str, Any]:
    return {
        "grant_id": g.grant_id,
        "program": g.program,
        "product": g.product,
        "subject": g.subject,
        "models": list(g.models) if g.models is not None else None,
        "created_at": g.created_at,
        "approvals": [
            {"role": a.role, "reviewer": a.reviewer, "at": a.at, "token": a.token}
            for a in g.approvals
        ],
        "enable_at": g.enable_at,
        "expires_at": g.expires_at,
        "suspended": g.suspended,
        "revoked": g.revoked,
    }


def grant_to_json(g: Grant) -> str:
    return json.dumps(grant_to_dict(g), sort_keys=True, separators=(",", ":"))


def grant_from_json(raw: bytes | str) -> Grant:
    d = json.loads(raw)
    models = d.get("models")
    return Grant(
        grant_id=d["grant_id"],
        program=d["program"],
        product=d["product"],
        subject=d["subject"],
        models=tuple(models) if models is not None else None,
        created_at=float(d["created_at"]),
        approvals=tuple(
            Approval(a["role"], a["reviewer"], float(a["at"]), a.get("token", ""))
            for a in d.get("approvals", ())
        ),
        enable_at=d.get("enable_at"),
        expires_at=d.get("expires_at"),
        suspended=bool(d.get("suspended")),
        revoked=bool(d.get("revoked")),
    )


def grants_from_hash(raw: RawHash) -> GrantMap:
    out: dict[tuple[str, str], Grant] = {}
    for value in raw.values():
        g = grant_from_json(value)
        out[(g.program, g.product)] = g
    return out


def flag_to_json(f: Flag, flag_id: str) -> str:
    return json.dumps(
        {
            "id": flag_id,
            "at": f.at,
            "category": f.category,
            "severity": f.severity,
            "source": f.source,
            "note": f.note,
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def flag_from_json(raw: bytes | str) -> Flag:
    d = json.loads(raw)
    return Flag(
        at=float(d["at"]),
        category=d["category"],
        severity=int(d["severity"]),
        source=d["source"],
        note=d.get("note"),
    )


def standing_from(raw: RawHash, flags: list[Any]) -> Standing:
    suspended_at = _s(raw, "suspended_at")
    return Standing(
        flags=tuple(sorted((flag_from_json(f) for f in flags), key=lambda f: f.at)),
        suspended=_s(raw, "suspended") == "1",
        suspended_at=float(suspended_at) if suspended_at else None,
    )


# The untagged layout 1 of single-node releases, for its migration (``migrate.py``): a prefix and
# the layout 2 name of the rest of the key; keys renamed whole; short-lived keys dropped.
LAYOUT_1_RENAMES: dict[str, Callable[[str], str]] = {
    "ap:apikey:": apikey_key,
    "ap:ws:": workspace_key,
    "ap:org:": org_key,
    "ap:grant:": grant_key,
    "ap:sgrants:": subject_grants_key,
    "ap:standing:": standing_key,
    "ap:flags:": flags_key,
    "ap:orgws:": org_workspaces_key,
    "ap:usage:": usage_key,
}
LAYOUT_1_FIXED = {"ap:audit": AUDIT_LIST, "ap:audit:head": AUDIT_HEAD}
LAYOUT_1_DROPPED = ("ap:rl:", "ap:cc:", "ap:replicas")
