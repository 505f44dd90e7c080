"""The config schema (SPEC §8): parse one YAML file, validate all of it with located errors, and
build an immutable ``Config`` snapshot (``proxy.configdiff`` says what changes between two).

A snapshot is never mutated. A request takes the current snapshot once and uses it to the end,
so a reload never changes a request halfway.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

DEFAULT_PATH = "config/proxy.yaml"
PHASES = ("closed", "preview", "ga")
ROLES = ("operator", "viewer")  # plus "approver:<role>"
# Settings a running process keeps until restart (the worker count is a command-line flag).
RESTART_ONLY = (
    "listen",
    "admin.listen",
    "redis.url",
    "state_dir",
    "cache.max_entries",
    "keys.pepper_env",
    "keys.pepper_file",
)


# --------------------------------------------------------------------------- snapshot types


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class AdminToken:
    name: str
    sha256: str
    roles: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Listen
    tokens: tuple[AdminToken, ...]
    tokens_by_hash: Mapping[str, AdminToken]


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str
    timeout_ms: int
    breaker_failures: int
    breaker_reset_s: float


@dataclass(frozen=True, slots=True)
class KeysConfig:
    pepper_env: str
    pepper_file: str | None


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float
    first_byte_s: float
    idle_s: float


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str
    api_key_env: str | None
    timeouts: Timeouts


@dataclass(frozen=True, slots=True)
class Route:
    path_prefix: str
    product: str
    upstream: str
    rewrite_prefix: str | None
    host: str | None


@dataclass(frozen=True, slots=True)
class Program:
    name: str
    models: tuple[str, ...]
    required_approvals: tuple[str, ...]
    phases: Mapping[str, str]
    blocked_categories: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CacheConfig:
    ttl_seconds: float
    stale_if_error_seconds: float
    max_entries: int
    propagation_target_ms: int


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    min_score: int
    rate_limit_factor: float
    blocked_categories: tuple[str, ...]
    block_seconds: float | None
    suspend: bool
    shadow: bool


@dataclass(frozen=True, slots=True)
class ClassifierConfig:
    url: str | None
    timeout_ms: int
    fail_mode: str


@dataclass(frozen=True, slots=True)
class MisuseConfig:
    window_seconds: float
    upstream_flag_header: str
    classifier: ClassifierConfig
    tiers: tuple[Tier, ...]  # sorted by min_score


@dataclass(frozen=True, slots=True)
class RateLimit:
    requests_per_minute: int
    burst: int
    concurrent: int
    shadow: bool


@dataclass(frozen=True, slots=True)
class RateLimits:
    default: RateLimit
    programs: Mapping[str, RateLimit]
    enabled: bool = True

    def for_program(self, program: str | None) -> RateLimit:
        if program is None:
            return self.default
        return self.programs.get(program, self.default)


@dataclass(frozen=True, slots=True)
class Price:
    input: float
    output: float
    cached_input: float | None
    cache_write: float | None


@dataclass(frozen=True, slots=True)
class Pricing:
    cache_write_multiplier: float
    cached_input_discount: float
    models: Mapping[str, Price]


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int


@dataclass(frozen=True)
class Config:
    listen: Listen
    admin: AdminConfig
    redis: RedisConfig
    keys: KeysConfig
    products: tuple[str, ...]
    upstreams: Mapping[str, Upstream]
    routes: tuple[Route, ...]
    programs: Mapping[str, Program]
    unlisted_models: str
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    limits: Limits
    cache: CacheConfig
    misuse: MisuseConfig
    rate_limits: RateLimits
    pricing: Pricing
    state_dir: str
    shutdown_grace_s: float
    version: str
    source: str
    program_of_model: Mapping[str, str] = field(default_factory=dict)

    def route_for(self, path: str, host: str | None) -> Route | None:
        for route in self.routes:
            if path.startswith(route.path_prefix) and (route.host is None or route.host == host):
                return route
        return None


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    path: str
    message: str
    line: int | None = None

    def format(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line is not None else source
        return f"{where}: {_printable(self.path) or '<root>'}: {_printable(self.message)}"


def _printable(text: str) -> str:
    """Escape control characters (a YAML key may hold a newline) so an issue stays one line."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


class ConfigError(Exception):
    def __init__(self, source: str, issues: list[ConfigIssue]) -> None:
        self.source = source
        self.issues = issues
        super().__init__("\n".join(i.format(source) for i in issues))

    def as_list(self) -> list[dict[str, Any]]:
        return [{"path": i.path, "line": i.line, "message": i.message} for i in self.issues]


# --------------------------------------------------------------------------- YAML with lines


def _yaml_problem(exc: yaml.YAMLError) -> tuple[str, int | None]:
    """One line for a YAML error (PyYAML's own text spans several lines with a source excerpt)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        context = exc.context
        if context and exc.context_mark is not None and exc.context_mark is not mark:
            context = f"{context} (line {exc.context_mark.line + 1})"
        text = ", ".join(part for part in (context, exc.problem) if part)
        if mark is not None:
            text = f"{text} (column {mark.column + 1})"
        return text, mark.line + 1 if mark is not None else None
    return " ".join(str(exc).split()), None


def _compose(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML and remember the line of every key path (1-based)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        problem, line = _yaml_problem(exc)
        issue = ConfigIssue("", f"YAML syntax error: {problem}", line)
        raise ConfigError(source, [issue]) from None
    except RecursionError:
        raise ConfigError(source, [ConfigIssue("", "YAML nesting is too deep")]) from None
    lines: dict[str, int] = {}
    issues: list[ConfigIssue] = []
    constructor = yaml.SafeLoader("")
    open_nodes: set[int] = set()  # nodes being walked: an alias back to one is a cycle

    def scalar(n: yaml.Node, path: str) -> Any:
        try:
            return constructor.construct_object(n)
        except yaml.YAMLError as exc:
            problem, _ = _yaml_problem(exc)
            issues.append(ConfigIssue(path, f"unsupported YAML: {problem}", n.start_mark.line + 1))
            return None

    def walk(n: yaml.Node | None, path: str) -> Any:
        if n is None:
            return None
        lines.setdefault(path, n.start_mark.line + 1)
        if id(n) in open_nodes:
            issues.append(ConfigIssue(path, "recursive YAML alias", n.start_mark.line + 1))
            return None
        if isinstance(n, yaml.MappingNode):
            open_nodes.add(id(n))
            out: dict[Any, Any] = {}
            for k, v in n.value:
                line = k.start_mark.line + 1
                if not isinstance(k, yaml.ScalarNode):
                    issues.append(ConfigIssue(path, "a mapping key must be a plain scalar", line))
                    continue
                if k.tag == "tag:yaml.org,2002:merge":
                    issues.append(ConfigIssue(path, "merge keys (<<) are not supported", line))
                    continue
                key = scalar(k, path)
                sub = f"{path}.{key}" if path else str(key)
                if key in out:
                    issues.append(ConfigIssue(sub, "duplicate key", line))
                lines[sub] = line
                out[key] = walk(v, sub)
            open_nodes.discard(id(n))
            return out
        if isinstance(n, yaml.SequenceNode):
            open_nodes.add(id(n))
            items = [walk(v, f"{path}[{i}]") for i, v in enumerate(n.value)]
            open_nodes.discard(id(n))
            return items
        return scalar(n, path)

    try:
        data = walk(node, "")
    except RecursionError:
        raise ConfigError(source, [ConfigIssue("", "YAML nesting is too deep")]) from None
    if issues:
        raise ConfigError(source, issues)
    return data, lines


# --------------------------------------------------------------------------- validation

T = TypeVar("T")
_MISSING = object()


class _Checker:
    """Collects every problem instead of stopping at the first."""

    def __init__(self, lines: dict[str, int]) -> None:
        self.lines = lines
        self.issues: list[ConfigIssue] = []

    def err(self, path: str, message: str) -> None:
        line = self.lines.get(path)
        if line is None:  # fall back to the nearest parent that has a line, but not the root
            parent = path
            while line is None and parent:
                shorter = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", parent)
                parent = "" if shorter == parent else shorter
                line = self.lines.get(parent) if parent else None
        self.issues.append(ConfigIssue(path, message, line))

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.err(path, f"must be a mapping, got {_kind(value)}")
            return {}
        for key in value:
            if key not in allowed:
                self.err(
                    _join(path, str(key)),
                    f"unknown key {key!r} (allowed: {', '.join(allowed)})",
                )
        return value

    def get(
        self,
        m: Mapping[str, Any],
        key: str,
        path: str,
        kind: type[T] | tuple[type, ...],
        default: Any = _MISSING,
        check: Callable[[Any], str | None] | None = None,
    ) -> Any:
        p = _join(path, key)
        if key not in m or (m[key] is None and default is not _MISSING):
            if default is _MISSING:
                self.err(p, "is required")
                return None
            return default
        value = m[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            self.err(p, f"must be {names}, got {_kind(value)}")
            return default if default is not _MISSING else None
        if check is not None:
            problem = check(value)
            if problem:
                self.err(p, problem)
        return value


def _keys_of(value: Any) -> tuple[str, ...]:
    """The keys of a mapping whose keys are names (upstreams, programs): any key is allowed."""
    return tuple(value) if isinstance(value, dict) else ()


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _port(v: Any) -> str | None:
    return None if 0 <= v <= 65535 else "must be a port number 0..65535"


def _http_url(v: Any) -> str | None:
    try:
        parts = urlsplit(v)
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        return f"must be an http:// or https:// URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return "must be an http:// or https:// URL"
    return None


def _listen(c: _Checker, value: Any, path: str, host: str, port: int) -> Listen:
    m = c.mapping(value, path, ("host", "port"))
    return Listen(
        host=c.get(m, "host", path, str, host),
        port=c.get(m, "port", path, int, port, _port),
    )


def _str_list(c: _Checker, m: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    value = c.get(m, key, path, list, [])
    out: list[str] = []
    for i, item in enumerate(value or []):
        if not isinstance(item, str) or not item:
            c.err(f"{_join(path, key)}[{i}]", f"must be a non-empty string, got {_kind(item)}")
        else:
            out.append(item)
    return tuple(out)


def _rate_limit(c: _Checker, value: Any, path: str, base: RateLimit | None) -> RateLimit:
    m = c.mapping(value, path, ("requests_per_minute", "burst", "concurrent", "shadow"))
    b = base or RateLimit(600, 60, 50, False)
    return RateLimit(
        requests_per_minute=c.get(
            m, "requests_per_minute", path, int, b.requests_per_minute, _positive
        ),
        burst=c.get(m, "burst", path, int, b.burst, _non_negative),
        concurrent=c.get(m, "concurrent", path, int, b.concurrent, _positive),
        shadow=c.get(m, "shadow", path, bool, False),
    )


_TOP = (
    "listen",
    "admin",
    "redis",
    "keys",
    "products",
    "upstreams",
    "routes",
    "programs",
    "unlisted_models",
    "trusted_proxies",
    "limits",
    "cache",
    "misuse",
    "rate_limits",
    "pricing",
    "state_dir",
    "shutdown_grace_s",
)


def build(data: Any, lines: dict[str, int], source: str, version: str) -> Config:
    """Validate parsed YAML and build a snapshot, or raise ConfigError with every issue."""
    c = _Checker(lines)
    if data is None:
        data = {}
    top = c.mapping(data, "", _TOP)

    listen = _listen(c, top.get("listen"), "listen", "0.0.0.0", 8080)

    admin_m = c.mapping(top.get("admin"), "admin", ("listen", "tokens"))
    admin_listen = _listen(c, admin_m.get("listen"), "admin.listen", "127.0.0.1", 9090)
    tokens: list[AdminToken] = []
    seen_names: set[str] = set()
    seen_hashes: set[str] = set()
    for i, raw in enumerate(c.get(admin_m, "tokens", "admin", list, []) or []):
        p = f"admin.tokens[{i}]"
        tm = c.mapping(raw, p, ("name", "sha256", "roles"))
        if not tm:
            continue
        name = c.get(tm, "name", p, str)
        digest = c.get(
            tm,
            "sha256",
            p,
            str,
            check=lambda v: (
                None
                if re.fullmatch(r"[0-9a-f]{64}", v)
                else "must be 64 lowercase hex characters (sha256 of the token)"
            ),
        )
        roles = _str_list(c, tm, "roles", p)
        for j, role in enumerate(roles):
            if role not in ROLES and not re.fullmatch(r"approver:[a-z0-9_-]+", role):
                c.err(
                    f"{p}.roles[{j}]",
                    f"unknown role {role!r} (operator, viewer or approver:<role>)",
                )
        if not roles:
            c.err(f"{p}.roles", "must list at least one role")
        if name in seen_names:
            c.err(f"{p}.name", f"duplicate admin token name {name!r}")
        if digest in seen_hashes:
            c.err(f"{p}.sha256", "duplicate token hash")
        if name and digest:
            seen_names.add(name)
            seen_hashes.add(digest)
            tokens.append(AdminToken(name, digest, roles))
    admin = AdminConfig(
        listen=admin_listen,
        tokens=tuple(tokens),
        tokens_by_hash=MappingProxyType({t.sha256: t for t in tokens}),
    )

    rm = c.mapping(
        top.get("redis"), "redis", ("url", "timeout_ms", "breaker_failures", "breaker_reset_s")
    )
    redis_cfg = RedisConfig(
        url=c.get(rm, "url", "redis", str, "embedded"),
        timeout_ms=c.get(rm, "timeout_ms", "redis", int, 50, _positive),
        breaker_failures=c.get(rm, "breaker_failures", "redis", int, 3, _positive),
        breaker_reset_s=c.get(rm, "breaker_reset_s", "redis", float, 1.0, _positive),
    )
    if redis_cfg.url != "embedded":
        from proxy.store.topology import parse_url  # here: the store imports this module

        try:
            parse_url(redis_cfg.url)
        except ValueError as exc:
            c.err("redis.url", f"must be 'embedded' or a Redis URL of SPEC §2: {exc}")

    km = c.mapping(top.get("keys"), "keys", ("pepper_env", "pepper_file"))
    keys = KeysConfig(
        pepper_env=c.get(km, "pepper_env", "keys", str, "ACCESS_PROXY_PEPPER"),
        pepper_file=c.get(km, "pepper_file", "keys", str, None),
    )

    products = _str_list(c, top, "products", "") or ("api", "codex", "chatgpt")
    if len(set(products)) != len(products):
        c.err("products", "lists a product twice")

    upstreams: dict[str, Upstream] = {}
    if "upstreams" not in top:
        c.err("upstreams", "is required")
    um = c.mapping(top.get("upstreams"), "upstreams", _keys_of(top.get("upstreams")))
    for name, raw in um.items():
        p = f"upstreams.{name}"
        m = c.mapping(raw, p, ("url", "api_key_env", "timeouts"))
        tm = c.mapping(m.get("timeouts"), f"{p}.timeouts", ("connect_s", "first_byte_s", "idle_s"))
        tp = f"{p}.timeouts"
        upstreams[str(name)] = Upstream(
            name=str(name),
            url=(c.get(m, "url", p, str, check=_http_url) or "").rstrip("/"),
            api_key_env=c.get(m, "api_key_env", p, str, None),
            timeouts=Timeouts(
                connect_s=c.get(tm, "connect_s", tp, float, 5.0, _positive),
                first_byte_s=c.get(tm, "first_byte_s", tp, float, 120.0, _positive),
                idle_s=c.get(tm, "idle_s", tp, float, 60.0, _positive),
            ),
        )

    routes: list[Route] = []
    route_keys: set[tuple[str | None, str | None]] = set()
    if "routes" not in top:
        c.err("routes", "is required")
    for i, raw in enumerate(c.get(top, "routes", "", list, []) or []):
        p = f"routes[{i}]"
        m = c.mapping(raw, p, ("path_prefix", "product", "upstream", "rewrite_prefix", "host"))
        if not m:
            continue
        prefix = c.get(
            m,
            "path_prefix",
            p,
            str,
            check=lambda v: None if v.startswith("/") else "must start with '/'",
        )
        product = c.get(m, "product", p, str)
        upstream = c.get(m, "upstream", p, str)
        if product is not None and product not in products:
            c.err(f"{p}.product", f"unknown product {product!r} (products: {', '.join(products)})")
        if upstream is not None and upstream not in upstreams:
            c.err(f"{p}.upstream", f"route to undefined upstream {upstream!r}")
        rewrite = c.get(
            m,
            "rewrite_prefix",
            p,
            str,
            None,
            lambda v: None if v.startswith("/") else "must start with '/'",
        )
        host = c.get(m, "host", p, str, None)
        if prefix and (host, prefix) in route_keys:
            c.err(f"{p}.path_prefix", f"duplicate route for path_prefix {prefix!r}")
        route_keys.add((host, prefix))
        if prefix and product and upstream:
            routes.append(Route(prefix, product, upstream, rewrite, host))
    # Longest prefix first, so /codex/v1/ wins over /v1/-style catch-alls regardless of order.
    routes.sort(key=lambda r: (r.host is None, -len(r.path_prefix)))

    programs: dict[str, Program] = {}
    program_of_model: dict[str, str] = {}
    if "programs" not in top:
        c.err("programs", "is required")
    pm = c.mapping(top.get("programs"), "programs", _keys_of(top.get("programs")))
    known_roles = {r.split(":", 1)[1] for t in tokens for r in t.roles if r.startswith("approver:")}
    for name, raw in pm.items():
        p = f"programs.{name}"
        m = c.mapping(raw, p, ("models", "required_approvals", "phases", "blocked_categories"))
        models = _str_list(c, m, "models", p)
        if "models" not in m:
            c.err(f"{p}.models", "is required")
        seen: set[str] = set()
        for j, model in enumerate(models):
            if model in seen:
                c.err(f"{p}.models[{j}]", f"model {model!r} listed twice")
            elif model in program_of_model:
                c.err(
                    f"{p}.models[{j}]",
                    f"model {model!r} already belongs to program {program_of_model[model]!r}",
                )
            else:
                program_of_model[model] = str(name)
            seen.add(model)
        approvals = _str_list(c, m, "required_approvals", p)
        if not approvals:
            approvals = ("provider",)
        if len(set(approvals)) != len(approvals):
            c.err(f"{p}.required_approvals", "lists a role twice")
        for j, role in enumerate(approvals):
            if known_roles and role not in known_roles:
                c.err(
                    f"{p}.required_approvals[{j}]",
                    f"unknown approval role {role!r}: no admin token has approver:{role}",
                )
        phm = c.mapping(m.get("phases"), f"{p}.phases", products)
        phases: dict[str, str] = {}
        for product in products:
            phase = c.get(phm, product, f"{p}.phases", str, "closed")
            if phase not in PHASES:
                c.err(f"{p}.phases.{product}", f"phase must be one of {', '.join(PHASES)}")
            phases[product] = phase
        programs[str(name)] = Program(
            name=str(name),
            models=models,
            required_approvals=approvals,
            phases=MappingProxyType(phases),
            blocked_categories=tuple(x.lower() for x in _str_list(c, m, "blocked_categories", p)),
        )

    unlisted = c.get(
        top,
        "unlisted_models",
        "",
        str,
        "allow",
        lambda v: None if v in ("allow", "deny") else "must be allow or deny",
    )

    trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for i, item in enumerate(_str_list(c, top, "trusted_proxies", "")):
        try:
            trusted.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            c.err(f"trusted_proxies[{i}]", f"not an IP address or CIDR network: {item!r}")

    lm = c.mapping(top.get("limits"), "limits", ("max_body_bytes",))
    limits = Limits(c.get(lm, "max_body_bytes", "limits", int, 10 * 1024 * 1024, _positive))

    cm = c.mapping(
        top.get("cache"),
        "cache",
        ("ttl_seconds", "stale_if_error_seconds", "max_entries", "propagation_target_ms"),
    )
    cache = CacheConfig(
        ttl_seconds=c.get(cm, "ttl_seconds", "cache", float, 5.0, _positive),
        stale_if_error_seconds=c.get(cm, "stale_if_error_seconds", "cache", float, 300.0),
        max_entries=c.get(cm, "max_entries", "cache", int, 100_000, _positive),
        propagation_target_ms=c.get(cm, "propagation_target_ms", "cache", int, 100, _positive),
    )

    mm = c.mapping(
        top.get("misuse"),
        "misuse",
        ("window_seconds", "upstream_flag_header", "classifier", "tiers"),
    )
    clm = c.mapping(mm.get("classifier"), "misuse.classifier", ("url", "timeout_ms", "fail_mode"))
    classifier = ClassifierConfig(
        url=c.get(clm, "url", "misuse.classifier", str, None, _http_url),
        timeout_ms=c.get(clm, "timeout_ms", "misuse.classifier", int, 100, _positive),
        fail_mode=c.get(
            clm,
            "fail_mode",
            "misuse.classifier",
            str,
            "closed",
            lambda v: None if v in ("open", "closed") else "must be open or closed",
        ),
    )
    default_tiers: list[Any] = [
        {"name": "watch", "min_score": 1},
        {
            "name": "restricted",
            "min_score": 3,
            "rate_limit_factor": 0.2,
            "blocked_categories": ["cyber"],
        },
        {"name": "cooldown", "min_score": 5, "block_seconds": 900},
        {"name": "suspended", "min_score": 8},
    ]
    tiers: list[Tier] = []
    tier_index: dict[str, int] = {}
    tier_names: set[str] = set()
    for i, raw in enumerate(c.get(mm, "tiers", "misuse", list, default_tiers) or []):
        p = f"misuse.tiers[{i}]"
        m = c.mapping(
            raw,
            p,
            (
                "name",
                "min_score",
                "rate_limit_factor",
                "blocked_categories",
                "block_seconds",
                "suspend",
                "shadow",
            ),
        )
        if not m:
            continue
        name = c.get(m, "name", p, str)
        if name is not None and (name in tier_names or name == "normal"):
            c.err(f"{p}.name", f"duplicate tier name {name!r}")
        tier_names.add(name)
        tier = Tier(
            name=name,
            min_score=c.get(m, "min_score", p, int, check=_positive),
            rate_limit_factor=c.get(m, "rate_limit_factor", p, float, 1.0, _positive),
            blocked_categories=tuple(x.lower() for x in _str_list(c, m, "blocked_categories", p)),
            block_seconds=c.get(m, "block_seconds", p, float, None, _positive),
            suspend=c.get(m, "suspend", p, bool, name == "suspended"),
            shadow=c.get(m, "shadow", p, bool, False),
        )
        if name is not None and tier.min_score is not None:
            tiers.append(tier)
            tier_index.setdefault(name, i)
    tiers.sort(key=lambda t: t.min_score)
    for a, b in itertools.pairwise(tiers):
        if a.min_score == b.min_score:
            later = max(tier_index[a.name], tier_index[b.name])
            c.err(
                f"misuse.tiers[{later}].min_score",
                f"tiers {a.name!r} and {b.name!r} share min_score {a.min_score}",
            )
    misuse = MisuseConfig(
        window_seconds=c.get(mm, "window_seconds", "misuse", float, 604800.0, _positive),
        upstream_flag_header=c.get(
            mm, "upstream_flag_header", "misuse", str, "x-safety-flag"
        ).lower(),
        classifier=classifier,
        tiers=tuple(tiers),
    )

    rlm = c.mapping(top.get("rate_limits"), "rate_limits", ("enabled", "default", "programs"))
    default_rl = _rate_limit(c, rlm.get("default"), "rate_limits.default", None)
    prm = c.mapping(rlm.get("programs"), "rate_limits.programs", _keys_of(rlm.get("programs")))
    program_limits: dict[str, RateLimit] = {}
    for name, raw in prm.items():
        if name not in programs:
            c.err(f"rate_limits.programs.{name}", f"unknown program {name!r}")
        program_limits[str(name)] = _rate_limit(c, raw, f"rate_limits.programs.{name}", default_rl)
    rate_limits = RateLimits(
        default_rl,
        MappingProxyType(program_limits),
        c.get(rlm, "enabled", "rate_limits", bool, True),
    )

    pr = c.mapping(
        top.get("pricing"),
        "pricing",
        ("cache_write_multiplier", "cached_input_discount", "models"),
    )
    prices: dict[str, Price] = {}
    pmm = c.mapping(pr.get("models"), "pricing.models", _keys_of(pr.get("models")))
    for model, raw in pmm.items():
        p = f"pricing.models.{model}"
        m = c.mapping(raw, p, ("input", "output", "cached_input", "cache_write"))
        prices[str(model)] = Price(
            input=c.get(m, "input", p, float, check=_non_negative) or 0.0,
            output=c.get(m, "output", p, float, check=_non_negative) or 0.0,
            cached_input=c.get(m, "cached_input", p, float, None, _non_negative),
            cache_write=c.get(m, "cache_write", p, float, None, _non_negative),
        )
    pricing = Pricing(
        cache_write_multiplier=c.get(
            pr, "cache_write_multiplier", "pricing", float, 1.25, _non_negative
        ),
        cached_input_discount=c.get(
            pr,
            "cached_input_discount",
            "pricing",
            float,
            0.9,
            lambda v: None if 0 <= v <= 1 else "must be between 0 and 1",
        ),
        models=MappingProxyType(prices),
    )

    state_dir = c.get(top, "state_dir", "", str, ".state")
    grace = c.get(top, "shutdown_grace_s", "", float, 30.0, _non_negative)

    if c.issues:
        raise ConfigError(source, c.issues)
    return Config(
        listen=listen,
        admin=admin,
        redis=redis_cfg,
        keys=keys,
        products=products,
        upstreams=MappingProxyType(upstreams),
        routes=tuple(routes),
        programs=MappingProxyType(programs),
        unlisted_models=unlisted,
        trusted_proxies=tuple(trusted),
        limits=limits,
        cache=cache,
        misuse=misuse,
        rate_limits=rate_limits,
        pricing=pricing,
        state_dir=state_dir,
        shutdown_grace_s=float(grace),
        version=version,
        source=source,
        program_of_model=MappingProxyType(program_of_model),
    )


def parse(text: str, source: str = "<config>") -> Config:
    data, lines = _compose(text, source)
    version = hashlib.sha256(text.encode()).hexdigest()[:12]
    return build(data, lines, source, version)


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a config file; the path defaults to env ACCESS_PROXY_CONFIG."""
    p = Path(path or os.environ.get("ACCESS_PROXY_CONFIG") or DEFAULT_PATH)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(str(p), [ConfigIssue("", f"cannot read file: {exc.strerror}")]) from None
    return parse(text, str(p))


def summary(cfg: Config) -> str:
    phases = ", ".join(
        f"{name}({'/'.join(f'{k}={v}' for k, v in p.phases.items())})"
        for name, p in cfg.programs.items()
    )
    return (
        f"{cfg.source}: ok, version {cfg.version}: {len(cfg.routes)} routes, "
        f"{len(cfg.upstreams)} upstreams, {len(cfg.programs)} programs [{phases}], "
        f"{len(cfg.admin.tokens)} admin tokens, {len(cfg.misuse.tiers)} tiers"
    )
