"""The config schema (SPEC §8): parse one YAML file, validate all of it with located errors, and
build an immutable ``Config`` snapshot (``proxy.configdiff`` says what changes between two).

Every setting is declared once, as a field of the section it belongs to, with its default, its
check and whether it needs a restart (``setting(...)``). The reader, the allowed keys of each
section, ``RESTART_ONLY``, the reload's restart-only rule and ``config check --diff`` all derive
from those declarations, so a new setting is one line here plus its use.

A snapshot is never mutated. A request takes the current snapshot once and uses it to the end,
so a reload never changes a request halfway.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import itertools
import re
import time
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType, UnionType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from proxy import env, modelnames

DEFAULT_PATH = "config/proxy.yaml"
PHASES = ("closed", "preview", "ga")
ROLES = ("operator", "viewer")  # plus "approver:<role>"

# --------------------------------------------------------------------------- declarations

Check = Callable[[Any], str | None]
REQUIRED: Any = object()  # the default of a setting the file must give


ReadFn = Callable[["_Reader", Any, str, dict[str, Any]], Any]


@dataclass(frozen=True, slots=True)
class Setting:
    """How one key of the file is read. ``read`` handles lists and maps of records (and checks
    that span keys); every other setting is read by its type: a scalar, a list of strings, or a
    nested section whose default is an instance of it."""

    default: Any = REQUIRED
    check: Check | None = None
    restart: bool = False  # kept from the running config by a reload until the next start
    convert: Callable[[Any], Any] | None = None
    read: ReadFn | None = None


def setting(
    default: Any = REQUIRED,
    *,
    check: Check | None = None,
    restart: bool = False,
    convert: Callable[[Any], Any] | None = None,
    read: ReadFn | None = None,
) -> Any:
    """Declare a field of a section as a key of the file."""
    return field(metadata={"setting": Setting(default, check, restart, convert, read)})


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


def _redis_url(v: Any) -> str | None:
    if v == "embedded":
        return None
    from proxy.store.topology import parse_url  # here: the store imports this module

    try:
        parse_url(v)
    except ValueError as exc:
        return f"must be 'embedded' or a Redis URL of SPEC §2: {exc}"
    return None


def _absolute_path(v: Any) -> str | None:
    return None if v.startswith("/") else "must start with '/'"


def _one_of(*choices: str) -> Check:
    message = f"must be {' or '.join(choices)}"
    return lambda v: None if v in choices else message


def _unique(message: str) -> Check:
    return lambda v: message if len(set(v)) != len(v) else None


def _sha256_hex(v: Any) -> str | None:
    if re.fullmatch(r"[0-9a-f]{64}", v):
        return None
    return "must be 64 lowercase hex characters (sha256 of the token)"


def _lower_all(v: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(x.lower() for x in v)


# --------------------------------------------------------------------------- records and sections


@dataclass(frozen=True, slots=True)
class Listen:
    host: str = setting()
    port: int = setting(check=_port)


@dataclass(frozen=True, slots=True)
class AdminToken:
    name: str = setting()
    sha256: str = setting(check=_sha256_hex)
    roles: tuple[str, ...] = setting(
        (), check=lambda v: None if v else "must list at least one role"
    )


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float = setting(5.0, check=_positive)
    first_byte_s: float = setting(120.0, check=_positive)
    idle_s: float = setting(60.0, check=_positive)


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str  # its key under `upstreams`
    url: str = setting(check=_http_url, convert=lambda v: (v or "").rstrip("/"))
    api_key_env: str | None = setting(None)  # the env var holding the upstream credential
    timeouts: Timeouts = setting()


@dataclass(frozen=True, slots=True)
class Route:
    path_prefix: str = setting(check=_absolute_path)
    product: str = setting()
    upstream: str = setting()
    rewrite_prefix: str | None = setting(None, check=_absolute_path)
    host: str | None = setting(None)


def _read_phases(r: _Reader, raw: Any, path: str, siblings: dict[str, Any]) -> Mapping[str, str]:
    products = r.root["products"]
    m = r.mapping(raw, path, products)
    phases: dict[str, str] = {}
    for product in products:
        phases[product] = r.get(m, product, path, str, "closed", _phase)
    return MappingProxyType(phases)


def _phase(v: Any) -> str | None:
    return None if v in PHASES else f"phase must be one of {', '.join(PHASES)}"


def instant(value: Any) -> float | None:
    """Epoch seconds of an RFC 3339 time with an offset (YAML may already give a datetime)."""
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.strip().upper())
        except ValueError:
            return None
    else:
        return None
    return when.timestamp() if when.tzinfo is not None else None


def rfc3339_utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read_instant(r: _Reader, raw: Any, path: str, siblings: dict[str, Any]) -> str | None:
    """An RFC 3339 time, kept in its UTC form (``...Z``), or None when absent."""
    if raw is None:
        return None
    at = instant(raw)
    if at is None:
        r.err(path, "must be an RFC 3339 time with an offset, e.g. 2026-07-24T00:00:00Z")
        return None
    return rfc3339_utc(at)


@dataclass(frozen=True, slots=True)
class Eligibility:
    # Grants may be requested only for orgs (and their workspaces) with an account representative.
    requires_account_representative: bool = setting(False)


@dataclass(frozen=True, slots=True)
class ReleaseGates:
    # No product of the program may be in `ga` before this time (RFC 3339).
    ga_not_before: str | None = setting(None, read=_read_instant)
    ga_not_before_t: float | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        at = instant(self.ga_not_before) if self.ga_not_before is not None else None
        object.__setattr__(self, "ga_not_before_t", at)


@dataclass(frozen=True, slots=True)
class Program:
    name: str  # its key under `programs`
    models: tuple[str, ...] = setting()  # exact names or globs
    required_approvals: tuple[str, ...] = setting(
        ("provider",), check=_unique("lists a role twice")
    )
    phases: Mapping[str, str] = setting(None, read=_read_phases)  # per product; default closed
    blocked_categories: tuple[str, ...] = setting((), convert=_lower_all)
    eligibility: Eligibility = setting()
    release_gates: ReleaseGates = setting()


@dataclass(frozen=True, slots=True)
class Tier:
    name: str = setting()
    min_score: int = setting(check=_positive)
    rate_limit_factor: float = setting(1.0, check=_positive)
    blocked_categories: tuple[str, ...] = setting((), convert=_lower_all)
    block_seconds: float | None = setting(None, check=_positive)
    suspend: bool = setting(None)  # default: true for the tier named `suspended`
    shadow: bool = setting(False)


@dataclass(frozen=True, slots=True)
class RateLimit:
    requests_per_minute: int = setting(600, check=_positive)
    burst: int = setting(60, check=_non_negative)
    concurrent: int = setting(50, check=_positive)
    shadow: bool = setting(False)
    # Input + output tokens per minute from metered usage (SPEC §6); None: no token limit.
    tokens_per_minute: int | None = setting(None, check=_positive)


@dataclass(frozen=True, slots=True)
class Price:
    input: float = setting(check=_non_negative)
    output: float = setting(check=_non_negative)
    cached_input: float | None = setting(None, check=_non_negative)
    cache_write: float | None = setting(None, check=_non_negative)


def _read_tokens(
    r: _Reader, raw: Any, path: str, siblings: dict[str, Any]
) -> tuple[AdminToken, ...]:
    tokens: list[AdminToken] = []
    seen_names: set[str] = set()
    seen_hashes: set[str] = set()
    for _, p, m in r.records(raw, path, AdminToken):
        values = r.fields(m, p, AdminToken)
        name, digest = values["name"], values["sha256"]
        for j, role in enumerate(values["roles"]):
            if role not in ROLES and not re.fullmatch(r"approver:[a-z0-9_-]+", role):
                r.err(
                    f"{p}.roles[{j}]",
                    f"unknown role {role!r} (operator, viewer or approver:<role>)",
                )
        if name in seen_names:
            r.err(f"{p}.name", f"duplicate admin token name {name!r}")
        if digest in seen_hashes:
            r.err(f"{p}.sha256", "duplicate token hash")
        if name and digest:
            seen_names.add(name)
            seen_hashes.add(digest)
            tokens.append(AdminToken(**values))
    return tuple(tokens)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Listen = setting(Listen("127.0.0.1", 9090), restart=True)
    tokens: tuple[AdminToken, ...] = setting(None, read=_read_tokens)
    tokens_by_hash: Mapping[str, AdminToken] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_hash = MappingProxyType({t.sha256: t for t in self.tokens})
        object.__setattr__(self, "tokens_by_hash", by_hash)


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = setting("embedded", check=_redis_url, restart=True)  # env REDIS_URL wins
    timeout_ms: int = setting(50, check=_positive)
    breaker_failures: int = setting(3, check=_positive)
    breaker_reset_s: float = setting(1.0, check=_positive)


@dataclass(frozen=True, slots=True)
class KeysConfig:
    pepper_env: str = setting("ACCESS_PROXY_PEPPER", restart=True)
    pepper_file: str | None = setting(None, restart=True)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    ttl_seconds: float = setting(5.0, check=_positive)
    stale_if_error_seconds: float = setting(300.0)
    max_entries: int = setting(100_000, check=_positive, restart=True)


@dataclass(frozen=True, slots=True)
class ClassifierConfig:
    url: str | None = setting(None, check=_http_url)
    timeout_ms: int = setting(100, check=_positive)
    fail_mode: str = setting("closed", check=_one_of("open", "closed"))


_DEFAULT_TIERS: list[Any] = [
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


def _read_tiers(r: _Reader, raw: Any, path: str, siblings: dict[str, Any]) -> tuple[Tier, ...]:
    tiers: list[Tier] = []
    tier_index: dict[str, int] = {}
    tier_names: set[str] = set()
    for i, p, m in r.records(raw, path, Tier):
        values = r.fields(m, p, Tier)
        name = values["name"]
        if name is not None and (name in tier_names or name == "normal"):
            r.err(f"{p}.name", f"duplicate tier name {name!r}")
        tier_names.add(name)
        if values["suspend"] is None:
            values["suspend"] = name == "suspended"
        if name is not None and values["min_score"] is not None:
            tiers.append(Tier(**values))
            tier_index.setdefault(name, i)
    tiers.sort(key=lambda t: t.min_score)
    for a, b in itertools.pairwise(tiers):
        if a.min_score == b.min_score:
            later = max(tier_index[a.name], tier_index[b.name])
            r.err(
                f"{path}[{later}].min_score",
                f"tiers {a.name!r} and {b.name!r} share min_score {a.min_score}",
            )
    return tuple(tiers)


@dataclass(frozen=True, slots=True)
class MisuseConfig:
    window_seconds: float = setting(604800.0, check=_positive)
    upstream_flag_header: str = setting("x-safety-flag", convert=str.lower)
    classifier: ClassifierConfig = setting()
    tiers: tuple[Tier, ...] = setting(_DEFAULT_TIERS, read=_read_tiers)  # sorted by min_score


def _read_program_limits(
    r: _Reader, raw: Any, path: str, siblings: dict[str, Any]
) -> Mapping[str, RateLimit]:
    # A program's limit inherits the unset numbers from the default, but not its shadow mode.
    base = dataclasses.replace(siblings["default"], shadow=False)
    limits: dict[str, RateLimit] = {}
    for name, p, item in r.named(raw, path):
        if name not in r.root["programs"]:
            r.err(p, f"unknown program {name!r}")
        limits[name] = RateLimit(**r.section(item, p, RateLimit, base))
    return MappingProxyType(limits)


@dataclass(frozen=True, slots=True)
class RateLimits:
    enabled: bool = setting(True)
    default: RateLimit = setting()
    programs: Mapping[str, RateLimit] = setting(None, read=_read_program_limits)
    # Requests a replica takes from the shared bucket at once (0: a Redis call per request), and
    # how long it may use them before the rest goes back (SPEC §5: bounded by a second).
    lease_requests: int = setting(8, check=_non_negative, restart=True)
    lease_ms: int = setting(
        500, check=lambda v: None if 1 <= v <= 1000 else "must be 1..1000", restart=True
    )

    def for_program(self, program: str | None) -> RateLimit:
        if program is None:
            return self.default
        return self.programs.get(program, self.default)


def _read_prices(r: _Reader, raw: Any, path: str, siblings: dict[str, Any]) -> Mapping[str, Price]:
    return MappingProxyType(
        {name: Price(**r.section(item, p, Price)) for name, p, item in r.named(raw, path)}
    )


@dataclass(frozen=True, slots=True)
class Pricing:  # USD per 1M tokens
    cache_write_multiplier: float = setting(1.25, check=_non_negative)
    cached_input_discount: float = setting(
        0.9, check=lambda v: None if 0 <= v <= 1 else "must be between 0 and 1"
    )
    models: Mapping[str, Price] = setting(None, read=_read_prices)


@dataclass(frozen=True, slots=True)
class UsageConfig:
    retention_days: int = setting(400, check=_positive)  # usage per UTC day kept this long


def _log_path(v: Any) -> str | None:
    return None if v.strip() else "must be stderr or a file path"


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    """SPEC §11. ``path`` is ``stderr`` or a file (relative: to where the command started)."""

    mode: str = setting("denials", check=_one_of("off", "denials", "all"))
    path: str = setting("stderr", check=_log_path)
    sample: float = setting(
        1.0, check=lambda v: None if 0 <= v <= 1 else "must be between 0 and 1", convert=float
    )
    queue_lines: int = setting(10_000, check=_positive)  # waiting for the writer; then dropped


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = setting(10 * 1024 * 1024, check=_positive)
    # Slow clients (SPEC §3.5): a request head must be whole, and a body must not stall, in time.
    client_header_timeout_s: float = setting(30.0, check=_positive)
    client_body_timeout_s: float = setting(60.0, check=_positive)


def _read_upstreams(
    r: _Reader, raw: Any, path: str, siblings: dict[str, Any]
) -> Mapping[str, Upstream]:
    return MappingProxyType(
        {
            name: Upstream(name=name, **r.section(item, p, Upstream))
            for name, p, item in r.named(raw, path)
        }
    )


def _read_routes(r: _Reader, raw: Any, path: str, siblings: dict[str, Any]) -> tuple[Route, ...]:
    products, upstreams = siblings["products"], siblings["upstreams"]
    routes: list[Route] = []
    seen: set[tuple[str | None, str | None]] = set()
    for _, p, m in r.records(raw, path, Route):
        values = r.fields(m, p, Route)
        prefix, product, upstream = values["path_prefix"], values["product"], values["upstream"]
        if product is not None and product not in products:
            r.err(f"{p}.product", f"unknown product {product!r} (products: {', '.join(products)})")
        if upstream is not None and upstream not in upstreams:
            r.err(f"{p}.upstream", f"route to undefined upstream {upstream!r}")
        if prefix and (values["host"], prefix) in seen:
            r.err(f"{p}.path_prefix", f"duplicate route for path_prefix {prefix!r}")
        seen.add((values["host"], prefix))
        if prefix and product and upstream:
            routes.append(Route(**values))
    # Longest prefix first, so /codex/v1/ wins over /v1/-style catch-alls regardless of order.
    routes.sort(key=lambda route: (route.host is None, -len(route.path_prefix)))
    return tuple(routes)


def _read_programs(
    r: _Reader, raw: Any, path: str, siblings: dict[str, Any]
) -> Mapping[str, Program]:
    tokens = siblings["admin"].tokens
    known_roles = {x.split(":", 1)[1] for t in tokens for x in t.roles if x.startswith("approver:")}
    programs: dict[str, Program] = {}
    for name, p, item in r.named(raw, path):
        values = r.section(item, p, Program)
        seen: set[str] = set()
        for j, model in enumerate(values["models"]):
            norm = modelnames.normalize(model)
            if not norm:
                r.err(f"{p}.models[{j}]", "a model name must not be empty")
            elif norm in seen:
                r.err(f"{p}.models[{j}]", f"model {model!r} listed twice")
            seen.add(norm)
        for j, role in enumerate(values["required_approvals"]):
            if known_roles and role not in known_roles:
                r.err(
                    f"{p}.required_approvals[{j}]",
                    f"unknown approval role {role!r}: no admin token has approver:{role}",
                )
        _check_release_gate(r, p, values["phases"], values["release_gates"])
        programs[name] = Program(name=name, **values)
    for c in modelnames.conflicts({n: prog.models for n, prog in programs.items()}):
        if modelnames.normalize(c.entry) == modelnames.normalize(c.other_entry):
            message = f"model {c.entry!r} already belongs to program {c.other_program!r}"
        else:
            message = (
                f"model {c.entry!r} overlaps {c.other_entry!r} of program {c.other_program!r}: "
                f"{c.example!r} would belong to both (a name belongs to one program only; "
                "case, dated snapshots and ft: fine-tunes count)"
            )
        r.err(f"{path}.{c.program}.models[{c.index}]", message)
    return MappingProxyType(programs)


def _check_release_gate(
    r: _Reader, path: str, phases: Mapping[str, str], gates: ReleaseGates
) -> None:
    """An error on each product put in ``ga`` while the program's release gate is closed."""
    opens = gates.ga_not_before_t
    if opens is None or r.now >= opens:
        return
    for product, phase in phases.items():
        if phase == "ga":
            r.err(
                f"{path}.phases.{product}",
                f"ga is not allowed before the release gate opens at {gates.ga_not_before} "
                f"({path}.release_gates.ga_not_before)",
            )


def _read_networks(
    r: _Reader, raw: Any, path: str, siblings: dict[str, Any]
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for i, item in enumerate(r.strings(raw, path)):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            r.err(f"{path}[{i}]", f"not an IP address or CIDR network: {item!r}")
    return tuple(networks)


@dataclass(frozen=True)
class Config:
    version: str  # the first 12 hex digits of the file's sha256
    source: str  # the file it was read from
    listen: Listen = setting(Listen("0.0.0.0", 8080), restart=True)
    admin: AdminConfig = setting()
    redis: RedisConfig = setting()
    keys: KeysConfig = setting()
    products: tuple[str, ...] = setting(
        ("api", "codex", "chatgpt"), check=_unique("lists a product twice")
    )
    upstreams: Mapping[str, Upstream] = setting(read=_read_upstreams)
    routes: tuple[Route, ...] = setting(read=_read_routes)
    programs: Mapping[str, Program] = setting(read=_read_programs)
    unlisted_models: str = setting("allow", check=_one_of("allow", "deny"))
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = setting(
        None, read=_read_networks
    )
    limits: Limits = setting()
    access_log: AccessLogConfig = setting()
    cache: CacheConfig = setting()
    misuse: MisuseConfig = setting()
    rate_limits: RateLimits = setting()
    pricing: Pricing = setting()
    usage: UsageConfig = setting()
    state_dir: str = setting(".state", restart=True)
    shutdown_grace_s: float = setting(30.0, check=_non_negative, convert=float)
    program_of_model: Mapping[str, str] = field(init=False, repr=False, compare=False)
    model_matcher: modelnames.ModelMatcher = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        owner = {m: name for name, p in self.programs.items() for m in p.models}
        object.__setattr__(self, "program_of_model", MappingProxyType(owner))
        matcher = modelnames.ModelMatcher(owner.items())
        object.__setattr__(self, "model_matcher", matcher)

    def program_of(self, model: str) -> str | None:
        """The program a requested model name belongs to (SPEC §3.3 name rules), if any."""
        return self.model_matcher.owner_of(model)

    def route_for(self, path: str, host: str | None) -> Route | None:
        for route in self.routes:
            if path.startswith(route.path_prefix) and (route.host is None or route.host == host):
                return route
        return None


# --------------------------------------------------------------------------- what derives from them


@dataclass(frozen=True, slots=True)
class Declared:
    """One declared key of a section: its name, how it is read, and what it holds."""

    name: str
    setting: Setting
    kind: Any  # a tuple of scalar types, _STRINGS, a section class, or None (read by `read`)


_STRINGS = "list of strings"


_DECLARED: dict[type, tuple[Declared, ...]] = {}


def declared(cls: type) -> tuple[Declared, ...]:
    """The keys a section class declares, in the order the file documents them."""
    known = _DECLARED.get(cls)
    if known is not None:
        return known
    hints = typing.get_type_hints(cls)
    out: list[Declared] = []
    for f in dataclasses.fields(cls):
        s = f.metadata.get("setting")
        if s is not None:
            out.append(Declared(f.name, s, None if s.read else _kind(hints[f.name])))
    _DECLARED[cls] = tuple(out)
    return _DECLARED[cls]


def _kind(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, UnionType) and len(args) == 1:  # `X | None`
        hint = args[0]
    if typing.get_origin(hint) is tuple and typing.get_args(hint) == (str, ...):
        return _STRINGS
    if dataclasses.is_dataclass(hint):
        return hint
    if hint in (str, int, float, bool):
        return (hint,)
    raise TypeError(f"no reader for a setting of type {hint!r}: give it read=")


def is_section(value: Any) -> bool:
    """Whether ``value`` is a section of declared settings (as opposed to a setting's value)."""
    return dataclasses.is_dataclass(value) and bool(declared(type(value)))


def _restart_paths(cls: type, path: str = "") -> Iterator[str]:
    for d in declared(cls):
        sub = f"{path}.{d.name}" if path else d.name
        if d.setting.restart:
            yield sub
        elif isinstance(d.kind, type):
            yield from _restart_paths(d.kind, sub)


# Settings a running process keeps until restart (the worker count is a command-line flag).
RESTART_ONLY = tuple(_restart_paths(Config))
_TOP = tuple(d.name for d in declared(Config))


def keep_restart_only(running: Any, new: Any) -> Any:
    """``new`` with every setting declared ``restart=True`` taken from ``running``."""
    changes: dict[str, Any] = {}
    for d in declared(type(new)):
        if d.setting.restart:
            changes[d.name] = getattr(running, d.name)
        elif isinstance(d.kind, type) and any(_restart_paths(d.kind)):
            changes[d.name] = keep_restart_only(getattr(running, d.name), getattr(new, d.name))
    return dataclasses.replace(new, **changes)


def redis_url(cfg: Config) -> str:
    """The Redis URL to use: env ``REDIS_URL`` wins over ``redis.url``."""
    return env.redis_url() or cfg.redis.url


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
    """Checks values and collects every problem instead of stopping at the first."""

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
            self.err(path, f"must be a mapping, got {_kind_name(value)}")
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
        check: Check | None = None,
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
            self.err(p, f"must be {names}, got {_kind_name(value)}")
            return default if default is not _MISSING else None
        if check is not None:
            problem = check(value)
            if problem:
                self.err(p, problem)
        return value

    def strings(self, value: Any, path: str) -> tuple[str, ...]:
        """A list of non-empty strings at ``path`` (absent or null: empty)."""
        out: list[str] = []
        items = self.get({"": value}, "", path, list, [])
        for i, item in enumerate(items or []):
            if not isinstance(item, str) or not item:
                self.err(f"{path}[{i}]", f"must be a non-empty string, got {_kind_name(item)}")
            else:
                out.append(item)
        return tuple(out)


class _Reader(_Checker):
    """Reads sections by their declarations; ``root`` holds the top-level values read so far,
    so a later section can check against an earlier one (routes against upstreams)."""

    def __init__(self, lines: dict[str, int], now: float) -> None:
        super().__init__(lines)
        self.root: dict[str, Any] = {}
        self.now = now  # the time release gates are judged at

    def section(
        self, raw: Any, path: str, cls: type, base: Any = None, into: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The values of the keys ``cls`` declares, read from the mapping ``raw``."""
        m = self.mapping(raw, path, tuple(d.name for d in declared(cls)))
        return self.fields(m, path, cls, base, into)

    def fields(
        self,
        m: Mapping[str, Any],
        path: str,
        cls: type,
        base: Any = None,
        into: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Like ``section`` for a mapping already checked; ``base`` supplies the defaults."""
        values: dict[str, Any] = {} if into is None else into
        for d in declared(cls):
            default = d.setting.default if base is None else getattr(base, d.name)
            value = self._one(m, d, path, default, values)
            values[d.name] = d.setting.convert(value) if d.setting.convert else value
        return values

    def _one(
        self, m: Mapping[str, Any], d: Declared, parent: str, default: Any, siblings: dict[str, Any]
    ) -> Any:
        s, key = d.setting, d.name
        path = _join(parent, key)
        if s.read is not None:
            if default is REQUIRED and key not in m:
                self.err(path, "is required")
            raw = m.get(key)
            if raw is None and default is not REQUIRED:
                raw = default
            return s.read(self, raw, path, siblings)
        if d.kind is _STRINGS:
            value = self.strings(m.get(key), path)
            if default is REQUIRED and key not in m:
                self.err(path, "is required")
            value = value or (() if default is REQUIRED else default)
            problem = s.check(value) if s.check is not None else None
            if problem:
                self.err(path, problem)
            return value
        if isinstance(d.kind, type):
            base = default if isinstance(default, d.kind) else None
            return d.kind(**self.section(m.get(key), path, d.kind, base))
        return self.get(
            m, key, parent, d.kind, _MISSING if default is REQUIRED else default, s.check
        )

    def records(self, raw: Any, path: str, cls: type) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """Each non-empty mapping of the list at ``path``, checked for the keys ``cls`` declares."""
        keys = tuple(d.name for d in declared(cls))
        for i, item in enumerate(self.get({"": raw}, "", path, list, []) or []):
            p = f"{path}[{i}]"
            m = self.mapping(item, p, keys)
            if m:
                yield i, p, m

    def named(self, raw: Any, path: str) -> Iterator[tuple[str, str, Any]]:
        """Each entry of a mapping whose keys are names (upstreams, programs): any key goes."""
        for name, item in self.mapping(raw, path, _keys_of(raw)).items():
            yield str(name), f"{path}.{name}", item


def _keys_of(value: Any) -> tuple[str, ...]:
    return tuple(value) if isinstance(value, dict) else ()


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path and key else path or key


def _kind_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def build(
    data: Any, lines: dict[str, int], source: str, version: str, now: float | None = None
) -> Config:
    """Validate parsed YAML and build a snapshot, or raise ConfigError with every issue.

    ``now`` (default: the clock) is the time release gates are judged at."""
    r = _Reader(lines, time.time() if now is None else now)
    values = r.section({} if data is None else data, "", Config, into=r.root)
    if r.issues:
        raise ConfigError(source, r.issues)
    return Config(**values, version=version, source=source)


def parse(text: str, source: str = "<config>", now: float | None = None) -> Config:
    data, lines = _compose(text, source)
    version = hashlib.sha256(text.encode()).hexdigest()[:12]
    return build(data, lines, source, version, now)


def load(path: str | Path | None = None, now: float | None = None) -> Config:
    """Read and validate a config file; the path defaults to env ACCESS_PROXY_CONFIG."""
    p = Path(path or env.config_path() or DEFAULT_PATH)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(str(p), [ConfigIssue("", f"cannot read file: {exc.strerror}")]) from None
    return parse(text, str(p), now)


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
