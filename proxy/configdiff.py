"""`access-proxy config check`: validate a config file as `serve` would, and say what a new file
changes in effect compared with an old one (``--diff``), flagging settings that need a restart.

Admin tokens are compared by name; their hashes are never printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from proxy import config
from proxy.config import Config, ConfigError, Program, Route


@dataclass(frozen=True, slots=True)
class Change:
    """One difference in effect: ``before`` is None for an addition, ``after`` for a removal."""

    area: str
    path: str
    before: str | None
    after: str | None
    restart_required: bool = False

    @property
    def kind(self) -> str:
        if self.restart_required:
            return "!"
        if self.before is None:
            return "+"
        if self.after is None:
            return "-"
        return "~"


def _render(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, config.Listen):
        return f"{value.host}:{value.port}"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    return str(value)


class _Differ:
    def __init__(self) -> None:
        self.changes: list[Change] = []

    def changed(self, area: str, path: str, before: Any, after: Any) -> None:
        if before != after:
            restart = path in config.RESTART_ONLY
            self.changes.append(Change(area, path, _render(before), _render(after), restart))

    def added(self, area: str, path: str, description: str = "") -> None:
        self.changes.append(Change(area, path, None, description))

    def removed(self, area: str, path: str) -> None:
        self.changes.append(Change(area, path, "", None))

    def section(self, area: str, path: str, before: Any, after: Any) -> None:
        """Compare two snapshots of one section key by key, as the section declares them: a
        setting added to a section shows in the diff without a line here."""
        for d in config.declared(type(before)):
            sub = f"{path}.{d.name}" if path else d.name
            a, b = getattr(before, d.name), getattr(after, d.name)
            special = _SPECIAL.get(sub)
            if special is not None:
                special(self, _AREA.get(sub, sub.split(".")[0]), sub, a, b)
            elif config.is_section(a) and not isinstance(a, config.Listen):
                self.section(area or d.name, sub, a, b)
            elif isinstance(a, Mapping):
                self.mapping(
                    area, sub, a, b, lambda p, x, y: self.record(area, p, x, y), _describe_fields
                )
            else:
                self.changed(area or _AREA.get(sub, d.name), sub, a, b)

    def record(self, area: str, path: str, before: Any, after: Any) -> None:
        """One entry of a list or map of records (a tier, a program's rate limit, a price)."""
        if config.is_section(before):
            self.section(area, path, before, after)
        else:
            self.changed(area, path, before, after)

    def mapping(
        self,
        area: str,
        path: str,
        before: Mapping[str, Any],
        after: Mapping[str, Any],
        compare: Callable[[str, Any, Any], None],
        describe: Callable[[Any], str],
        name: str = "{path}.{key}",
    ) -> None:
        """Entries by key: removed, added (with ``describe``), or compared; ``name`` is how an
        entry's path is written."""
        for key in before:
            if key not in after:
                self.removed(area, name.format(path=path, key=key))
        for key, value in after.items():
            sub = name.format(path=path, key=key)
            if key not in before:
                self.added(area, sub, describe(value))
            else:
                compare(sub, before[key], value)

    def members(self, area: str, path: str, before: Iterable[Any], after: Iterable[Any]) -> None:
        """A set-like list: report members added and removed, not reordering."""
        old, new = [_render(v) for v in before], [_render(v) for v in after]
        for item in old:
            if item not in new:
                self.removed(area, f"{path}[{item}]")
        for item in new:
            if item not in old:
                self.added(area, f"{path}[{item}]")


def _describe_program(p: Program) -> str:
    phases = ", ".join(f"{k}={v}" for k, v in p.phases.items())
    return f"models {_render(p.models)}, approvals {_render(p.required_approvals)}, phases {phases}"


def _route_key(r: Route) -> str:
    return f"{r.host or ''}{r.path_prefix}"


def _describe_route(r: Route) -> str:
    text = f"product {r.product}, upstream {r.upstream}"
    if r.rewrite_prefix is not None:
        text += f", rewrite {r.rewrite_prefix}"
    return text


def _describe_fields(value: Any) -> str:
    return ", ".join(
        f"{d.name} {_render(getattr(value, d.name))}"
        for d in config.declared(type(value))
        if d.name != "name"
    )


def _tokens(d: _Differ, area: str, path: str, old: Any, new: Any) -> None:
    """Admin tokens by name; a hash shows only as replaced, never its value."""
    old_tokens = {t.name: t for t in old}
    new_tokens = {t.name: t for t in new}
    for name in old_tokens:
        if name not in new_tokens:
            d.removed(area, f"{path}.{name}")
    for name, token in new_tokens.items():
        before = old_tokens.get(name)
        if before is None:
            d.added(area, f"{path}.{name}", f"roles {_render(token.roles)}")
            continue
        d.changed(area, f"{path}.{name}.roles", before.roles, token.roles)
        if before.sha256 != token.sha256:
            d.changed(area, f"{path}.{name}.sha256", "(hidden)", "(hidden, replaced)")


def _routes(d: _Differ, area: str, path: str, old: Any, new: Any) -> None:
    """Routes by host and path prefix: their order in the file does not matter."""

    def compare(sub: str, a: Route, b: Route) -> None:
        for f in ("product", "upstream", "rewrite_prefix"):
            d.changed(area, f"{sub}.{f}", getattr(a, f), getattr(b, f))

    d.mapping(
        area,
        path,
        {_route_key(r): r for r in old},
        {_route_key(r): r for r in new},
        compare,
        _describe_route,
        name="{path}[{key}]",
    )


def _programs(d: _Differ, area: str, path: str, old: Any, new: Any) -> None:
    def compare(sub: str, a: Program, b: Program) -> None:
        for k in config.declared(Program):
            x, y = getattr(a, k.name), getattr(b, k.name)
            if k.name in ("models", "blocked_categories"):
                d.members(area, f"{sub}.{k.name}", x, y)
            elif config.is_section(x):
                d.section(area, f"{sub}.{k.name}", x, y)
            elif isinstance(x, Mapping):
                d.mapping(
                    area, f"{sub}.{k.name}", x, y, lambda p, v, w: d.changed(area, p, v, w), str
                )
            else:
                d.changed(area, f"{sub}.{k.name}", x, y)

    d.mapping(area, path, old, new, compare, _describe_program)


def _members(d: _Differ, area: str, path: str, old: Any, new: Any) -> None:
    d.members(area, path, old, new)


def _upstreams(d: _Differ, area: str, path: str, old: Any, new: Any) -> None:
    d.mapping(
        area, path, old, new, lambda p, a, b: d.section(area, p, a, b), lambda u: f"url {u.url}"
    )


def _tiers(d: _Differ, area: str, path: str, old: Any, new: Any) -> None:
    d.mapping(
        area,
        path,
        {t.name: t for t in old},
        {t.name: t for t in new},
        lambda p, a, b: d.section(area, p, a, b),
        _describe_fields,
    )


# Settings compared by their own rule (by name, as a set, hiding hashes); every other setting is
# compared value by value through the declarations.
_SPECIAL: dict[str, Callable[[_Differ, str, str, Any, Any], None]] = {
    "admin.tokens": _tokens,
    "products": _members,
    "upstreams": _upstreams,
    "routes": _routes,
    "programs": _programs,
    "trusted_proxies": _members,
    "misuse.tiers": _tiers,
}
# The area a top-level setting is reported under, where it is not its own name.
_AREA = {"unlisted_models": "programs", "shutdown_grace_s": "shutdown"}


def diff(old: Config, new: Config) -> list[Change]:
    """What changes in effect when ``new`` replaces ``old`` (the version itself is not a change)."""
    d = _Differ()
    d.section("", "", old, new)
    return d.changes


def format_changes(changes: Sequence[Change]) -> str:
    """One line per change: ``~`` changed, ``+`` added, ``-`` removed, ``!`` needs a restart."""
    if not changes:
        return "no changes in effect"
    lines = []
    for ch in changes:
        if ch.restart_required:
            lines.append(f"! {ch.path}: {ch.before} -> {ch.after} (needs a restart)")
        elif ch.before is None:
            lines.append(f"+ {ch.path}: {ch.after}" if ch.after else f"+ {ch.path}")
        elif ch.after is None:
            lines.append(f"- {ch.path}")
        else:
            lines.append(f"~ {ch.path}: {ch.before} -> {ch.after}")
    return "\n".join(lines)


def check_command(path: str | None, out: TextIO = sys.stdout) -> int:
    """Validate like ``serve``: print the one-line summary and return 0, or every error and 1."""
    try:
        cfg = config.load(path)
    except ConfigError as exc:
        print(exc, file=out)
        return 1
    print(config.summary(cfg), file=out)
    return 0


def diff_command(old_path: str, new_path: str, out: TextIO = sys.stdout) -> int:
    """Print what ``new_path`` changes in effect over ``old_path``; 1 if either is invalid."""
    loaded: list[Config] = []
    failed = False
    for path in (old_path, new_path):
        try:
            loaded.append(config.load(path))
        except ConfigError as exc:
            print(exc, file=out)
            failed = True
    if failed:
        return 1
    print(format_changes(diff(loaded[0], loaded[1])), file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.configdiff")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("path", nargs="?")
    compare = sub.add_parser("diff", help="what a new config changes in effect")
    compare.add_argument("old")
    compare.add_argument("new")
    args = parser.parse_args(argv)
    if args.command == "check":
        return check_command(args.path)
    return diff_command(args.old, args.new)


if __name__ == "__main__":
    sys.exit(main())
