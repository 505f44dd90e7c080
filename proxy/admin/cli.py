"""``access-proxy admin``: the operators' command line over the admin API (SPEC §7).

The admin URL and token come from ``--url``/``--token`` or the env vars ACCESS_PROXY_ADMIN_URL
and ACCESS_PROXY_ADMIN_TOKEN. Output is a human-readable table by default and the API's JSON with
``--json``. A failure exits 1 with the API's error message on stderr; a usage error exits 2.
``audit verify`` fetches the whole log and recomputes the hash chain here, on the client.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from proxy import env
from proxy.admin.client import DEFAULT_URL, TOKEN_ENV, URL_ENV, AdminClient, AdminError, seg

AUDIT_PAGE = 1000
DESCRIPTION = (
    f"Operate access-proxy through its admin API. The URL and token come from --url/--token or "
    f"env {URL_ENV}/{TOKEN_ENV}; --json prints the API's JSON."
)


@dataclass
class Output:
    data: Any
    text: str
    exit_code: int = 0


Command = Callable[[AdminClient, argparse.Namespace], Output]


# --------------------------------------------------------------------------- rendering


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Rows under upper-case headers, columns padded to their widest cell."""
    cells = [[h.upper() for h, _ in columns]]
    cells += [[_cell(row.get(k)) for _, k in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def pairs(data: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    keys = list(keys) if keys is not None else list(data)
    width = max((len(k) for k in keys), default=0)
    return "\n".join(f"{k.ljust(width)}  {_cell(data.get(k))}" for k in keys)


GRANT_KEYS = (
    "grant_id",
    "state",
    "program",
    "product",
    "subject",
    "models",
    "required_approvals",
    "missing_approvals",
    "created_at",
    "enable_at",
    "expires_at",
    "suspended",
    "revoked",
)


def grant_text(g: dict[str, Any]) -> str:
    text = pairs(g, GRANT_KEYS)
    approvals = g.get("approvals") or []
    if approvals:
        text += "\napprovals:\n" + _indent(
            table(approvals, (("role", "role"), ("reviewer", "reviewer"), ("at", "at")))
        )
    return text


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


# --------------------------------------------------------------------------- commands


def orgs_create(c: AdminClient, a: argparse.Namespace) -> Output:
    body: dict[str, Any] = {"id": a.id}
    if a.name is not None:
        body["name"] = a.name
    if a.account_rep is not None:
        body["account_representative"] = a.account_rep
    data = c.call("POST", "/orgs", body)
    return Output(data, "created org\n" + pairs(data))


def orgs_show(c: AdminClient, a: argparse.Namespace) -> Output:
    data = c.call("GET", f"/orgs/{seg(a.id)}")
    return Output(data, pairs(data))


def orgs_account_rep(c: AdminClient, a: argparse.Namespace) -> Output:
    rep = getattr(a, "representative", None)
    data = c.call("PATCH", f"/orgs/{seg(a.id)}", {"account_representative": rep})
    return Output(data, pairs(data))


def orgs_suspension(c: AdminClient, a: argparse.Namespace) -> Output:
    data = c.call("POST", f"/orgs/{seg(a.id)}/{a.action}", {"reason": a.reason})
    return Output(data, pairs(data))


def workspaces_create(c: AdminClient, a: argparse.Namespace) -> Output:
    body: dict[str, Any] = {"id": a.id, "org_id": a.org}
    if a.name is not None:
        body["name"] = a.name
    data = c.call("POST", "/workspaces", body)
    return Output(data, "created workspace\n" + pairs(data))


def workspaces_suspension(c: AdminClient, a: argparse.Namespace) -> Output:
    data = c.call("POST", f"/workspaces/{seg(a.id)}/{a.action}", {"reason": a.reason})
    return Output(data, pairs(data))


def keys_issue(c: AdminClient, a: argparse.Namespace) -> Output:
    body = {"name": a.name} if a.name is not None else {}
    data = c.call("POST", f"/workspaces/{seg(a.workspace)}/keys", body)
    text = pairs(data, ("key_id", "workspace_id", "name", "key"))
    return Output(data, text + "\nthe key is shown only now: store it safely")


def keys_revoke(c: AdminClient, a: argparse.Namespace) -> Output:
    c.call("DELETE", f"/keys/{seg(a.key_id)}")
    return Output({"key_id": a.key_id, "revoked": True}, f"revoked key {a.key_id}")


def grants_request(c: AdminClient, a: argparse.Namespace) -> Output:
    body: dict[str, Any] = {"program": a.program, "product": a.product, "subject": a.subject}
    if a.models:
        body["models"] = [m for item in a.models for m in item.split(",") if m]
    if a.expires_at is not None:
        body["expires_at"] = a.expires_at
    data = c.call("POST", "/grants", body)
    return Output(data, grant_text(data))


def grants_show(c: AdminClient, a: argparse.Namespace) -> Output:
    data = c.call("GET", f"/grants/{seg(a.grant_id)}")
    return Output(data, grant_text(data))


def grants_list(c: AdminClient, a: argparse.Namespace) -> Output:
    query = {"subject": a.subject, "program": a.program, "product": a.product}
    data = c.call("GET", "/grants", query=query)
    rows = data["grants"]
    columns = (
        ("grant_id", "grant_id"),
        ("subject", "subject"),
        ("program", "program"),
        ("product", "product"),
        ("state", "state"),
        ("missing", "missing_approvals"),
        ("enable_at", "enable_at"),
        ("expires_at", "expires_at"),
    )
    return Output(data, table(rows, columns) if rows else "no grants")


def grants_approve(c: AdminClient, a: argparse.Namespace) -> Output:
    body = {"role": a.role, "reviewer": a.reviewer}
    data = c.call("POST", f"/grants/{seg(a.grant_id)}/approve", body)
    return Output(data, grant_text(data))


def grants_enable(c: AdminClient, a: argparse.Namespace) -> Output:
    body = {"at": a.at} if a.at is not None else {}
    data = c.call("POST", f"/grants/{seg(a.grant_id)}/enable", body)
    return Output(data, grant_text(data))


def grants_lifecycle(c: AdminClient, a: argparse.Namespace) -> Output:
    data = c.call("POST", f"/grants/{seg(a.grant_id)}/{a.action}", {"reason": a.reason})
    return Output(data, grant_text(data))


def explain(c: AdminClient, a: argparse.Namespace) -> Output:
    query = {
        "key_id": a.key_id,
        "workspace": a.workspace,
        "product": a.product,
        "model": a.model,
    }
    data = c.call("GET", "/explain", query=query)
    verdict = "allow" if data["allowed"] else f"deny {data['status']} {data['code']}"
    lines = [
        f"decision  {verdict}",
        f"rule      {data['rule']}",
        f"detail    {data['detail']}",
        f"at        {data['at']} (config {data['config_version']})",
    ]
    facts = data.get("facts", {})
    for name in ("key", "workspace", "org", "standing"):
        if facts.get(name) is not None:
            lines.append(f"{name.ljust(9)} {_cell(facts[name])}")
    for name in ("program", "phase", "deciding_grant"):
        if name in facts:
            lines.append(f"{name.ljust(9)} {_cell(facts[name])}")
    for level, grant in (facts.get("grants") or {}).items():
        if grant is not None:
            lines.append(f"{level} grant:")
            lines.append(_indent(grant_text(grant)))
    if data.get("not_evaluated"):
        lines.append("not evaluated: " + "; ".join(data["not_evaluated"]))
    return Output(data, "\n".join(lines))


STANDING_KEYS = ("score", "tier", "until", "suspended", "suspended_at", "shadow_tier")


def standing_text(data: dict[str, Any]) -> str:
    text = pairs(data, STANDING_KEYS)
    flags = data.get("flags") or []
    if flags:
        columns = (
            ("at", "at"),
            ("category", "category"),
            ("severity", "severity"),
            ("source", "source"),
            ("expires_at", "expires_at"),
            ("note", "note"),
        )
        text += "\nflags in the window:\n" + _indent(table(flags, columns))
    else:
        text += "\nno flags in the window"
    return text


def flags_add(c: AdminClient, a: argparse.Namespace) -> Output:
    body: dict[str, Any] = {"category": a.category, "severity": a.severity, "source": a.source}
    if a.note is not None:
        body["note"] = a.note
    data = c.call("POST", f"/workspaces/{seg(a.workspace)}/flags", body)
    return Output(data, standing_text(data))


def standing_show(c: AdminClient, a: argparse.Namespace) -> Output:
    data = c.call("GET", f"/workspaces/{seg(a.workspace)}/standing")
    return Output(data, standing_text(data))


def standing_clear(c: AdminClient, a: argparse.Namespace) -> Output:
    data = c.call("POST", f"/workspaces/{seg(a.workspace)}/standing/clear", {"reason": a.reason})
    return Output(data, "flags cleared\n" + standing_text(data))


def _usage_table(rows: list[dict[str, Any]], first: str) -> str:
    """Usage rows (totals with their ``tokens`` by kind) as a table led by column ``first``."""
    for row in rows:
        row.update(row.get("tokens") or {})
        row["cost_usd"] = f"{float(row.get('cost_usd') or 0):.6f}"
    names = (first, "requests", "input", "cached_input", "cache_write", "output", "cost_usd")
    return table(rows, tuple((name, name) for name in names))


def usage_text(data: dict[str, Any]) -> str:
    rows = [{"model": "(all)", **data}]
    rows += [{"model": model, **totals} for model, totals in (data.get("models") or {}).items()]
    return f"workspace  {data.get('workspace')}\n" + _usage_table(rows, "model")


def usage_days_text(data: dict[str, Any]) -> str:
    rows = [{"day": day.get("date"), **day} for day in data.get("days") or []]
    rows.append({"day": "(sum)", **data})
    head = f"workspace  {data.get('workspace')}  {data.get('from')} .. {data.get('to')} (UTC)"
    return head + "\n" + _usage_table(rows, "day")


def usage_show(c: AdminClient, a: argparse.Namespace) -> Output:
    query = {k: v for k, v in (("from", a.since), ("to", a.until)) if v}
    path = f"/workspaces/{seg(a.workspace)}/usage"
    if query:
        path += "?" + urllib.parse.urlencode(query)
    data = c.call("GET", path)
    return Output(data, usage_days_text(data) if query else usage_text(data))


def config_reload(c: AdminClient, a: argparse.Namespace) -> Output:
    data = c.call("POST", "/config/reload")
    lines = [f"result   {data.get('result')}", f"version  {data.get('version')}"]
    lines += [f"changed  {line}" for line in data.get("changes") or []]
    lines += [f"restart required: {line}" for line in data.get("restart_required") or []]
    return Output(data, "\n".join(lines))


def audit_list(c: AdminClient, a: argparse.Namespace) -> Output:
    data = c.call("GET", "/audit", query={"after": a.after, "limit": a.limit})
    columns = (
        ("seq", "seq"),
        ("at", "at"),
        ("actor", "actor"),
        ("action", "action"),
        ("target", "target"),
        ("reason", "reason"),
    )
    rows = data["entries"]
    return Output(data, table(rows, columns) if rows else "no entries")


def check_chain(entries: list[dict[str, Any]], head: dict[str, Any]) -> tuple[int | None, str]:
    """The seq of the first broken entry (None when the chain holds) and why."""
    from proxy.store.audit import verify_chain  # only here: it pulls in the Redis client

    for index, entry in enumerate(entries):
        if entry.get("seq") != index + 1:
            return index + 1, f"entry {index + 1} is missing or out of order"
    broken = verify_chain(entries)
    if broken is not None:
        return broken, f"entry {broken} does not match its hash or its predecessor's"
    head_seq = int(head.get("seq") or 0)
    if head_seq > len(entries):
        return len(entries) + 1, f"entries {len(entries) + 1}..{head_seq} are missing"
    if head_seq and entries[head_seq - 1].get("hash") != head.get("hash"):
        return head_seq, f"entry {head_seq} does not match the recorded head hash"
    return None, f"audit chain ok: {len(entries)} entries"


def audit_verify(c: AdminClient, a: argparse.Namespace) -> Output:
    entries: list[dict[str, Any]] = []
    head: dict[str, Any] = {}
    while True:
        page = c.call("GET", "/audit", query={"after": len(entries), "limit": AUDIT_PAGE})
        if not head:
            head = page["head"]
        entries.extend(page["entries"])
        if len(page["entries"]) < AUDIT_PAGE:
            break
    broken, why = check_chain(entries, head)
    data = {"ok": broken is None, "entries": len(entries), "broken_seq": broken, "detail": why}
    if broken is None:
        return Output(data, why)
    return Output(data, f"audit chain broken at entry {broken}: {why}", 1)


# --------------------------------------------------------------------------- parser


def _connection_options(p: argparse.ArgumentParser, leaf: bool) -> None:
    """``--url``, ``--token`` and ``--json``, accepted before or after the subcommand."""
    default: Any = argparse.SUPPRESS if leaf else None
    p.add_argument(
        "--url", default=default, help=f"admin API URL (env {URL_ENV}; default {DEFAULT_URL})"
    )
    p.add_argument("--token", default=default, help=f"admin token (env {TOKEN_ENV})")
    p.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if leaf else False,
        help="print the API's JSON instead of a table",
    )


def build_parser(parser: argparse.ArgumentParser) -> None:
    """Fill ``parser`` (the ``admin`` command) with its options and subcommands."""
    _connection_options(parser, leaf=False)
    groups = parser.add_subparsers(dest="admin_group", metavar="GROUP", required=True)
    for add in (_orgs, _workspaces, _keys, _grants, _misuse, _operations):
        add(groups)


def _group(groups: Any, name: str, help_text: str) -> Any:
    return groups.add_parser(name, help=help_text).add_subparsers(
        dest="admin_cmd", metavar="COMMAND", required=True
    )


def _leaf(sub: Any, name: str, func: Command, help_text: str, **defaults: Any) -> Any:
    p = sub.add_parser(name, help=help_text, description=help_text)
    _connection_options(p, leaf=True)
    p.set_defaults(admin_func=func, **defaults)
    return p


def _orgs(groups: Any) -> None:
    """admin orgs ..."""
    orgs = _group(groups, "orgs", "organizations")
    p = _leaf(orgs, "create", orgs_create, "create an org")
    p.add_argument("id")
    p.add_argument("--name")
    p.add_argument("--account-rep", help="the org's account representative (eligibility, SPEC §4)")
    p = _leaf(orgs, "show", orgs_show, "show an org")
    p.add_argument("id")
    p = _leaf(orgs, "set-account-rep", orgs_account_rep, "set the org's account representative")
    p.add_argument("id")
    p.add_argument("representative")
    p = _leaf(
        orgs,
        "clear-account-rep",
        orgs_account_rep,
        "clear the account representative (grants stay)",
    )
    p.add_argument("id")
    for action in ("suspend", "reinstate"):
        p = _leaf(orgs, action, orgs_suspension, f"{action} an org", action=action)
        p.add_argument("id")
        p.add_argument("--reason", required=True)


def _workspaces(groups: Any) -> None:
    """admin workspaces ..."""
    ws = _group(groups, "workspaces", "workspaces")
    p = _leaf(ws, "create", workspaces_create, "create a workspace in an org")
    p.add_argument("id")
    p.add_argument("--org", required=True, help="the org the workspace belongs to")
    p.add_argument("--name")
    for action in ("suspend", "reinstate"):
        p = _leaf(ws, action, workspaces_suspension, f"{action} a workspace", action=action)
        p.add_argument("id")
        p.add_argument("--reason", required=True)


def _keys(groups: Any) -> None:
    """admin keys ..."""
    keys = _group(groups, "keys", "API keys")
    p = _leaf(keys, "issue", keys_issue, "issue an API key for a workspace (shown once)")
    p.add_argument("workspace")
    p.add_argument("--name")
    p = _leaf(keys, "revoke", keys_revoke, "revoke an API key")
    p.add_argument("key_id")


def _grants(groups: Any) -> None:
    """admin grants ..."""
    grants = _group(groups, "grants", "grants")
    p = _leaf(grants, "request", grants_request, "request a grant of a program on a product")
    p.add_argument("--program", required=True)
    p.add_argument("--product", required=True)
    p.add_argument("--subject", required=True, help="org:<id> or workspace:<id>")
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        help="limit the grant to this model (repeatable, or comma-separated)",
    )
    p.add_argument("--expires-at", help="RFC 3339 time")
    p = _leaf(grants, "show", grants_show, "show one grant")
    p.add_argument("grant_id")
    p = _leaf(grants, "list", grants_list, "list grants")
    p.add_argument("--subject")
    p.add_argument("--program")
    p.add_argument("--product")
    p = _leaf(grants, "approve", grants_approve, "approve a grant for a role")
    p.add_argument("grant_id")
    p.add_argument("--role", required=True)
    p.add_argument("--reviewer", required=True)
    p = _leaf(grants, "enable", grants_enable, "set a grant's enable_at (default now)")
    p.add_argument("grant_id")
    p.add_argument("--at", help="RFC 3339 time")
    for action in ("suspend", "reinstate", "revoke"):
        p = _leaf(grants, action, grants_lifecycle, f"{action} a grant", action=action)
        p.add_argument("grant_id")
        p.add_argument("--reason", required=True)


def _misuse(groups: Any) -> None:
    """admin flags ... and admin standing ..."""
    flags = _group(groups, "flags", "misuse flags")
    p = _leaf(flags, "add", flags_add, "flag a workspace for misuse; prints its standing")
    p.add_argument("workspace")
    p.add_argument("--category", required=True, help="e.g. cyber")
    p.add_argument("--severity", required=True, type=int)
    p.add_argument("--source", required=True, help="who flags it, e.g. safety-pipeline")
    p.add_argument("--note")

    standing = _group(groups, "standing", "misuse standing")
    p = _leaf(standing, "show", standing_show, "a workspace's score, tier and flags")
    p.add_argument("workspace")
    p = _leaf(
        standing,
        "clear",
        standing_clear,
        "remove a workspace's flags (a misuse suspension stays until workspaces reinstate)",
    )
    p.add_argument("workspace")
    p.add_argument("--reason", required=True)


def _operations(groups: Any) -> None:
    """admin usage, config, explain and audit"""
    usage = _group(groups, "usage", "usage and cost")
    p = _leaf(
        usage,
        "show",
        usage_show,
        "a workspace's tokens, requests and cost: in all per model, or per UTC day",
    )
    p.add_argument("workspace")
    p.add_argument("--from", dest="since", metavar="YYYY-MM-DD", help="first UTC day")
    p.add_argument("--to", dest="until", metavar="YYYY-MM-DD", help="last UTC day (default today)")

    cfg = _group(groups, "config", "the proxy's config")
    _leaf(cfg, "reload", config_reload, "reload the config file on every replica (as SIGHUP)")

    p = _leaf(groups, "explain", explain, "the decision the data plane would take now")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--key-id")
    who.add_argument("--workspace")
    p.add_argument("--product", required=True)
    p.add_argument("--model")

    audit = _group(groups, "audit", "the audit log")
    p = _leaf(audit, "list", audit_list, "list audit entries")
    p.add_argument("--after", type=int, default=0, help="entries after this seq")
    p.add_argument("--limit", type=int, default=100)
    _leaf(audit, "verify", audit_verify, "recompute the hash chain; name the first broken entry")


def add_admin_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``admin`` command to a top-level ``add_subparsers()`` object."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "admin", help="operate the proxy through its admin API", description=DESCRIPTION
    )
    build_parser(parser)
    return parser


def run_admin(args: argparse.Namespace) -> int:
    url = args.url or env.get(URL_ENV) or DEFAULT_URL
    token = args.token or env.get(TOKEN_ENV)
    if not token:
        print(f"error: no admin token: pass --token or set {TOKEN_ENV}", file=sys.stderr)
        return 2
    try:
        out: Output = args.admin_func(AdminClient(url, token), args)
    except AdminError as exc:
        where = f" (HTTP {exc.status}, {exc.code})" if exc.status else ""
        print(f"error: {exc.message}{where}", file=sys.stderr)
        existing = exc.body.get("grant_id")
        if existing:
            print(f"existing grant: {existing}", file=sys.stderr)
        for issue in exc.body.get("errors") or []:
            if isinstance(issue, dict):
                where = issue.get("path") or "-"
                line = f" (line {issue['line']})" if issue.get("line") else ""
                print(f"  {where}{line}: {issue.get('message')}", file=sys.stderr)
        if args.json and exc.body:
            print(json.dumps(exc.body, indent=2))
        return 1
    print(json.dumps(out.data, indent=2) if args.json else out.text)
    return out.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="access-proxy admin", description=DESCRIPTION)
    build_parser(parser)
    return run_admin(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
