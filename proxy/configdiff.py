"""`access-proxy config check`: validate a config file as `serve` would, and say what a new file
changes in effect compared with an old one (``--diff``), flagging settings that need a restart.

Admin tokens are compared by name; their hashes are never printed.
"""

from __future__ import annotations

import argparse
import dataclasses
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

    def fields(self, area: str, path: str, before: Any, after: Any) -> None:
        """Compare two snapshots of one dataclass field by field, descending into nested ones."""
        for f in dataclasses.fields(before):
            a, b = getattr(before, f.name), getattr(after, f.name)
            sub = f"{path}.{f.name}"
            if dataclasses.is_dataclass(a) and not isinstance(a, config.Listen):
                self.fields(area, sub, a, b)
            elif isinstance(a, Mapping):
                self.mapping(area, sub, a, b, lambda p, x, y: self.changed(area, p, x, y), _render)
            else:
                self.changed(area, sub, a, b)

    def mapping(
        self,
        area: str,
        path: str,
        before: Mapping[str, Any],
        after: Mapping[str, Any],
        compare: Callable[[str, Any, Any], None],
        describe: Callable[[Any], str],
    ) -> None:
        for key in before:
            if key not in after:
                self.removed(area, f"{path}.{key}")
        for key, value in after.items():
            if key not in before:
                self.added(area, f"{path}.{key}", describe(value))
            else:
                compare(f"{path}.{key}", before[key], value)

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


def _gate(at: float | None) -> str | None:
    return config.rfc3339_utc(at) if at is not None else None


def _route_key(r: Route) -> str:
    return f"{r.host or ''}{r.path_prefix}"


def _describe_route(r: Route) -> str:
    text = f"product {r.product}, upstream {r.upstream}"
    if r.rewrite_prefix is not None:
        text += f", rewrite {r.rewrite_prefix}"
    return text


def _describe_fields(value: Any) -> str:
    return ", ".join(
        f"{f.name} {_render(getattr(value, f.name))}"
        for f in dataclasses.fields(value)
        if f.name != "name"
    )


def diff(old: Config, new: Config) -> list[Change]:
    """What changes in effect when ``new`` replaces ``old`` (the version itself is not a change)."""
    d = _Differ()

    d.changed("listen", "listen", old.listen, new.listen)
    d.changed("admin", "admin.listen", old.admin.listen, new.admin.listen)
    d.changed("redis", "redis.url", old.redis.url, new.redis.url)
    d.changed("state_dir", "state_dir", old.state_dir, new.state_dir)

    old_tokens = {t.name: t for t in old.admin.tokens}
    new_tokens = {t.name: t for t in new.admin.tokens}
    for name in old_tokens:
        if name not in new_tokens:
            d.removed("admin", f"admin.tokens.{name}")
    for name, token in new_tokens.items():
        before = old_tokens.get(name)
        if before is None:
            d.added("admin", f"admin.tokens.{name}", f"roles {_render(token.roles)}")
            continue
        d.changed("admin", f"admin.tokens.{name}.roles", before.roles, token.roles)
        if before.sha256 != token.sha256:
            d.changed("admin", f"admin.tokens.{name}.sha256", "(hidden)", "(hidden, replaced)")

    for f in ("timeout_ms", "breaker_failures", "breaker_reset_s"):
        d.changed("redis", f"redis.{f}", getattr(old.redis, f), getattr(new.redis, f))
    d.fields("keys", "keys", old.keys, new.keys)
    d.members("products", "products", old.products, new.products)

    d.mapping(
        "upstreams",
        "upstreams",
        old.upstreams,
        new.upstreams,
        lambda p, a, b: d.fields("upstreams", p, a, b),
        lambda u: f"url {u.url}",
    )

    old_routes = {_route_key(r): r for r in old.routes}
    new_routes = {_route_key(r): r for r in new.routes}
    for key in old_routes:
        if key not in new_routes:
            d.removed("routes", f"routes[{key}]")
    for key, route in new_routes.items():
        if key not in old_routes:
            d.added("routes", f"routes[{key}]", _describe_route(route))
        else:
            for f in ("product", "upstream", "rewrite_prefix"):
                before_value, after_value = getattr(old_routes[key], f), getattr(route, f)
                d.changed("routes", f"routes[{key}].{f}", before_value, after_value)

    def compare_program(path: str, a: Program, b: Program) -> None:
        d.members("programs", f"{path}.models", a.models, b.models)
        d.changed(
            "programs", f"{path}.required_approvals", a.required_approvals, b.required_approvals
        )
        d.mapping(
            "programs",
            f"{path}.phases",
            a.phases,
            b.phases,
            lambda p, x, y: d.changed("programs", p, x, y),
            str,
        )
        d.members(
            "programs", f"{path}.blocked_categories", a.blocked_categories, b.blocked_categories
        )
        d.changed(
            "programs",
            f"{path}.eligibility.requires_account_representative",
            a.requires_account_representative,
            b.requires_account_representative,
        )
        d.changed(
            "programs",
            f"{path}.release_gates.ga_not_before",
            _gate(a.ga_not_before),
            _gate(b.ga_not_before),
        )

    d.mapping(
        "programs", "programs", old.programs, new.programs, compare_program, _describe_program
    )
    d.changed("programs", "unlisted_models", old.unlisted_models, new.unlisted_models)
    d.members("trusted_proxies", "trusted_proxies", old.trusted_proxies, new.trusted_proxies)
    d.fields("limits", "limits", old.limits, new.limits)
    d.fields("cache", "cache", old.cache, new.cache)

    for f in ("window_seconds", "upstream_flag_header"):
        d.changed("misuse", f"misuse.{f}", getattr(old.misuse, f), getattr(new.misuse, f))
    d.fields("misuse", "misuse.classifier", old.misuse.classifier, new.misuse.classifier)
    d.mapping(
        "misuse",
        "misuse.tiers",
        {t.name: t for t in old.misuse.tiers},
        {t.name: t for t in new.misuse.tiers},
        lambda p, a, b: d.fields("misuse", p, a, b),
        _describe_fields,
    )

    d.changed(
        "rate_limits", "rate_limits.enabled", old.rate_limits.enabled, new.rate_limits.enabled
    )
    d.fields("rate_limits", "rate_limits.default", old.rate_limits.default, new.rate_limits.default)
    d.mapping(
        "rate_limits",
        "rate_limits.programs",
        old.rate_limits.programs,
        new.rate_limits.programs,
        lambda p, a, b: d.fields("rate_limits", p, a, b),
        _describe_fields,
    )

    for f in ("cache_write_multiplier", "cached_input_discount"):
        d.changed("pricing", f"pricing.{f}", getattr(old.pricing, f), getattr(new.pricing, f))
    d.mapping(
        "pricing",
        "pricing.models",
        old.pricing.models,
        new.pricing.models,
        lambda p, a, b: d.fields("pricing", p, a, b),
        _describe_fields,
    )
    d.changed("shutdown", "shutdown_grace_s", old.shutdown_grace_s, new.shutdown_grace_s)
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
