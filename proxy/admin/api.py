"""The admin HTTP API (SPEC §7): orgs, workspaces, keys, grants, misuse standing, explain, the
audit log, config reload and usage totals (SPEC §10).

Every request presents ``Authorization: Bearer <admin token>``; the token's SHA-256 names it in
the live config, with its roles: ``operator`` changes things, ``approver:<role>`` approves grants
for that role only, and every token may read (``viewer`` can do nothing else). The config
snapshot is read once per request. Bodies are validated strictly (unknown fields, wrong types,
unknown programs or products, malformed times → 422 naming the field) before anything is written;
every change goes through ``Writes``, which appends the audit entry in the same transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from redis import exceptions as redis_errors

from proxy.admin.body import BodyInvalid, parse_object
from proxy.admin.explain import explain, grant_view
from proxy.config import AdminToken, Config
from proxy.errors import CODES, error_payload
from proxy.identity import Peppers
from proxy.policy.standing import Flag, Standing, StandingView, describe, evaluate_standing
from proxy.snapshot import Holder
from proxy.store.audit import read_entries, rfc3339
from proxy.store.schema import AUDIT_HEAD
from proxy.store.usage import UsageStore, day_of, days_between, sum_views
from proxy.store.writes import (
    Actor,
    Conflict,
    Invalid,
    NotFound,
    StoreError,
    Writes,
    org_dict,
    workspace_dict,
)

log = logging.getLogger(__name__)

PREFIX = "/admin/v1"
STORE_RETRY_AFTER_S = 2
# Redis could not be reached or answered in time, or is loading or read-only (a replica during a
# failover): the store is away, not broken. Any other Redis error is a bug of ours.
_STORE_AWAY = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    OSError,
    asyncio.TimeoutError,
)
MAX_AUDIT_PAGE = 1000
MAX_USAGE_DAYS = 1000
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")
_SUBJECT = re.compile(r"(org|workspace):(.+)")
_CATEGORY = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MAX_SEVERITY = 100  # as for flags from the upstream header
UPSTREAM_SOURCE = "upstream"  # reserved for flags read from the upstream's safety header

CONFIG = web.RequestKey("admin_config", Config)
TOKEN = web.RequestKey("admin_token", AdminToken)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class AdminContext:
    holder: Holder  # live config snapshot
    writes: Writes  # on a Redis client with normal (seconds) timeouts
    peppers: Peppers
    reload: Callable[[], Awaitable[dict[str, Any]]] | None = None
    usage: UsageStore | None = None  # per-workspace keys; None: on the writes' client


class ApiError(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def _error(
    code: str, message: str | None = None, param: str | None = None, **extra: Any
) -> web.Response:
    body = error_payload(code, message, param)
    body.update(extra)
    return web.json_response(body, status=CODES[code].status)


# --------------------------------------------------------------------------- body validation


def parse_time(value: Any, param: str) -> float:
    """An RFC 3339 date-time (with offset) as epoch seconds, or 422 naming ``param``."""
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ApiError(
            "invalid_body", f"{param} must be an RFC 3339 time, e.g. 2025-06-01T12:00:00Z", param
        )
    text = value.upper().replace("Z", "+00:00")
    if "." in text:  # fromisoformat takes at most 6 fractional digits
        head, _, rest = text.partition(".")
        digits = re.match(r"\d+", rest)
        assert digits is not None
        text = f"{head}.{digits.group()[:6].ljust(6, '0')}{rest[digits.end() :]}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ApiError("invalid_body", f"{param} is not a valid time: {value!r}", param) from None


def _check_id(value: Any, param: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ApiError(
            "invalid_body",
            f"{param} must be 1-128 characters of letters, digits, '.', '_' or '-'",
            param,
        )
    return value


def _check_text(value: Any, param: str, max_len: int = 1000) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > max_len:
        raise ApiError("invalid_body", f"{param} must be a non-empty string", param)
    return value


def _check_name(value: Any, param: str) -> str:
    if not isinstance(value, str) or len(value) > 200:
        raise ApiError("invalid_body", f"{param} must be a string", param)
    return value


async def _body(
    request: web.Request, required: tuple[str, ...], optional: tuple[str, ...]
) -> dict[str, Any]:
    """The JSON object body; 422 for bad JSON, unknown fields and missing required fields."""
    try:
        raw = await request.read()
    except HttpProcessingError as exc:  # framing the parser refused once the body began
        raise ApiError("invalid_body", f"the body could not be read: {exc.message}") from None
    try:
        data = parse_object(raw)
    except BodyInvalid as exc:
        raise ApiError("invalid_body", exc.message, exc.param) from None
    for name in data:
        if name not in required and name not in optional:
            allowed = ", ".join((*required, *optional)) or "none"
            shown = name if len(name) <= 100 else name[:100] + "..."
            raise ApiError("invalid_body", f"unknown field {shown!r} (allowed: {allowed})", name)
    for name in required:
        if data.get(name) is None:
            raise ApiError("invalid_body", f"{name} is required", name)
    return data


def _query(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in request.query.items():
        if name not in allowed:
            raise ApiError(
                "invalid_body", f"unknown parameter {name!r} (allowed: {', '.join(allowed)})", name
            )
        if name in out:
            raise ApiError("invalid_body", f"parameter {name!r} given twice", name)
        out[name] = value
    return out


def _day_param(q: dict[str, str], name: str, default: str) -> str:
    if name not in q:
        return default
    value = q[name]
    try:
        if len(value) == 10:
            return date.fromisoformat(value).isoformat()
    except ValueError:
        pass
    raise ApiError("invalid_body", f"{name} must be a UTC day, YYYY-MM-DD", name)


def _int_param(q: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    if name not in q:
        return default
    try:
        value = int(q[name])
    except ValueError:
        raise ApiError("invalid_body", f"{name} must be an integer", name) from None
    if not low <= value <= high:
        raise ApiError("invalid_body", f"{name} must be between {low} and {high}", name)
    return value


def _account_representative(value: Any) -> str | None:
    if value is None:
        return None
    return _check_text(value, "account_representative", 200).strip()


def _subject(value: Any) -> str:
    match = _SUBJECT.fullmatch(value) if isinstance(value, str) else None
    if match is None or not _ID.fullmatch(match.group(2)):
        raise ApiError("invalid_body", "subject must be org:<id> or workspace:<id>", "subject")
    return str(value)


# --------------------------------------------------------------------------- the API


class AdminAPI:
    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx
        self.writes = ctx.writes
        self.read = ctx.writes.read

    @property
    def redis(self) -> aioredis.Redis:
        return self.writes.redis

    # auth -------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/admin/"):
            return await handler(request)  # health and metrics routes added beside the API
        cfg = self.ctx.holder.current.config
        token = self._token(request, cfg)
        if token is None:
            return _error("unauthorized")
        request[CONFIG] = cfg
        request[TOKEN] = token
        try:
            return await handler(request)
        except ApiError as exc:
            return _error(exc.code, exc.message, exc.param)
        except StoreError as exc:
            return _error(exc.code, exc.message, exc.param)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
            return _error("not_found", f"no admin endpoint {request.method} {request.path}")
        except web.HTTPRequestEntityTooLarge:
            return _error("invalid_body", "the body is too large")
        except _STORE_AWAY as exc:
            response = _error(
                "store_unavailable", f"the store is unreachable ({type(exc).__name__}); retry later"
            )
            response.headers["retry-after"] = str(STORE_RETRY_AFTER_S)
            return response
        except web.HTTPException:
            raise
        except Exception:  # a bug of ours: logged with its traceback, answered in the shape
            log.exception("admin %s %s failed", request.method, request.path)
            return _error("internal_error")

    @staticmethod
    def _token(request: web.Request, cfg: Config) -> AdminToken | None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value:
            return None
        return cfg.admin.tokens_by_hash.get(hashlib.sha256(value.encode()).hexdigest())

    @staticmethod
    def _need(request: web.Request, role: str) -> tuple[Config, Actor]:
        """The config and actor of this request, or 403 when the token lacks ``role``.

        ``read`` is granted to every token; ``approver`` to any ``approver:<role>`` token.
        """
        token = request[TOKEN]
        cfg = request[CONFIG]
        if role == "approver":
            ok = any(r.startswith("approver:") for r in token.roles)
        else:
            ok = role == "read" or role in token.roles
        if not ok:
            raise ApiError(
                "forbidden", f"token {token.name!r} lacks the {role} role for this action"
            )
        return cfg, Actor(token.name, cfg.version)

    # orgs and workspaces -----------------------------------------------------

    async def create_org(self, request: web.Request) -> web.Response:
        _, actor = self._need(request, "operator")
        body = await _body(request, ("id",), ("name", "account_representative"))
        org_id = _check_id(body["id"], "id")
        name = _check_name(body.get("name", ""), "name")
        rep = _account_representative(body.get("account_representative"))
        org = await self.writes.create_org(actor, org_id, name, rep)
        return web.json_response(org_dict(org), status=201)

    async def get_org(self, request: web.Request) -> web.Response:
        self._need(request, "read")
        org_id = request.match_info["org"]
        org = await self.read.org(org_id)
        if org is None:
            raise NotFound(f"org {org_id} not found")
        return web.json_response(org_dict(org))

    async def patch_org(self, request: web.Request) -> web.Response:
        _, actor = self._need(request, "operator")
        body = await _body(request, (), ("account_representative",))
        if "account_representative" not in body:
            raise ApiError(
                "invalid_body",
                "account_representative is required (null clears it)",
                "account_representative",
            )
        rep = _account_representative(body["account_representative"])
        org = await self.writes.set_account_representative(actor, request.match_info["org"], rep)
        return web.json_response(org_dict(org))

    async def org_suspension(self, request: web.Request) -> web.Response:
        _, actor = self._need(request, "operator")
        body = await _body(request, ("reason",), ())
        reason = _check_text(body["reason"], "reason")
        suspend = request.match_info["action"] == "suspend"
        org = await self.writes.set_org_suspended(actor, request.match_info["org"], suspend, reason)
        return web.json_response(org_dict(org))

    async def create_workspace(self, request: web.Request) -> web.Response:
        _, actor = self._need(request, "operator")
        body = await _body(request, ("id", "org_id"), ("name",))
        ws_id = _check_id(body["id"], "id")
        org_id = _check_id(body["org_id"], "org_id")
        name = _check_name(body.get("name", ""), "name")
        ws = await self.writes.create_workspace(actor, ws_id, org_id, name)
        return web.json_response(workspace_dict(ws), status=201)

    async def workspace_suspension(self, request: web.Request) -> web.Response:
        cfg, actor = self._need(request, "operator")
        body = await _body(request, ("reason",), ())
        reason = _check_text(body["reason"], "reason")
        suspend = request.match_info["action"] == "suspend"
        ws_id = request.match_info["ws"]
        ws = await self.writes.set_workspace_suspended(actor, ws_id, suspend, reason, cfg.misuse)
        return web.json_response(workspace_dict(ws))

    # keys ---------------------------------------------------------------------

    async def issue_key(self, request: web.Request) -> web.Response:
        _, actor = self._need(request, "operator")
        body = await _body(request, (), ("name",))
        name = _check_name(body.get("name", ""), "name")
        ws_id = request.match_info["ws"]
        key_id, key = await self.writes.issue_key(actor, ws_id, name, self.ctx.peppers)
        return web.json_response(
            {"key_id": key_id, "key": key, "workspace_id": ws_id, "name": name}, status=201
        )

    async def revoke_key(self, request: web.Request) -> web.Response:
        _, actor = self._need(request, "operator")
        await _body(request, (), ())
        await self.writes.revoke_key(actor, request.match_info["key_id"])
        return web.Response(status=204)

    # grants -------------------------------------------------------------------

    async def create_grant(self, request: web.Request) -> web.Response:
        cfg, actor = self._need(request, "operator")
        body = await _body(request, ("program", "product", "subject"), ("models", "expires_at"))
        program = body["program"]
        if not isinstance(program, str) or program not in cfg.programs:
            raise ApiError(
                "invalid_body",
                f"unknown program {program!r} (known: {', '.join(cfg.programs)})",
                "program",
            )
        product = body["product"]
        if not isinstance(product, str) or product not in cfg.products:
            raise ApiError(
                "invalid_body",
                f"unknown product {product!r} (known: {', '.join(cfg.products)})",
                "product",
            )
        subject = _subject(body["subject"])
        models: tuple[str, ...] | None = None
        if body.get("models") is not None:
            raw = body["models"]
            if not isinstance(raw, list) or not raw or not all(isinstance(m, str) for m in raw):
                raise ApiError(
                    "invalid_body", "models must be a non-empty list of strings", "models"
                )
            outside = [m for m in raw if m not in cfg.programs[program].models]
            if outside:
                raise ApiError(
                    "invalid_body", f"models not in {program}: {', '.join(outside)}", "models"
                )
            models = tuple(dict.fromkeys(raw))
        expires_at = None
        if body.get("expires_at") is not None:
            expires_at = parse_time(body["expires_at"], "expires_at")
        try:
            grant = await self.writes.create_grant(
                actor,
                program,
                product,
                subject,
                models,
                expires_at,
                cfg.programs[program].eligibility.requires_account_representative,
            )
        except Conflict as exc:
            return _error("conflict", exc.message, None, grant_id=exc.existing_id)
        return web.json_response(grant_view(grant, cfg, time.time()), status=201)

    async def get_grant(self, request: web.Request) -> web.Response:
        cfg, _ = self._need(request, "read")
        grant_id = request.match_info["grant_id"]
        grant = await self.read.grant(grant_id)
        if grant is None:
            raise NotFound(f"grant {grant_id} not found")
        return web.json_response(grant_view(grant, cfg, time.time()))

    async def list_grants(self, request: web.Request) -> web.Response:
        cfg, _ = self._need(request, "read")
        q = _query(request, ("subject", "program", "product"))
        subject = _subject(q["subject"]) if "subject" in q else None
        grants = await self.read.grant_list(subject, q.get("program"), q.get("product"))
        now = time.time()
        return web.json_response({"grants": [grant_view(g, cfg, now) for g in grants]})

    async def approve_grant(self, request: web.Request) -> web.Response:
        cfg, actor = self._need(request, "approver")
        body = await _body(request, ("role", "reviewer"), ())
        role = _check_text(body["role"], "role", 100)
        reviewer = _check_text(body["reviewer"], "reviewer", 200)
        token = request[TOKEN]
        if f"approver:{role}" not in token.roles:
            mine = ", ".join(r.split(":", 1)[1] for r in token.roles if r.startswith("approver:"))
            raise ApiError(
                "forbidden", f"token {token.name!r} may approve as {mine} only, not as {role}"
            )
        grant_id = request.match_info["grant_id"]
        grant = await self.read.grant(grant_id)
        if grant is None:
            raise NotFound(f"grant {grant_id} not found")
        program = cfg.programs.get(grant.program)
        required = program.required_approvals if program is not None else ()
        if role not in required:
            raise Invalid(
                f"{grant.program} does not require a {role} approval "
                f"(required: {', '.join(required) or 'none'})",
                "role",
            )
        grant = await self.writes.approve_grant(actor, grant_id, role, reviewer)
        return web.json_response(grant_view(grant, cfg, time.time()))

    async def enable_grant(self, request: web.Request) -> web.Response:
        cfg, actor = self._need(request, "operator")
        body = await _body(request, (), ("at",))
        now = time.time()
        at = parse_time(body["at"], "at") if body.get("at") is not None else now
        grant = await self.writes.enable_grant(actor, request.match_info["grant_id"], at)
        return web.json_response(grant_view(grant, cfg, time.time()))

    async def grant_lifecycle(self, request: web.Request) -> web.Response:
        cfg, actor = self._need(request, "operator")
        body = await _body(request, ("reason",), ())
        reason = _check_text(body["reason"], "reason")
        grant = await self.writes.apply_grant_action(
            actor, request.match_info["grant_id"], request.match_info["action"], reason
        )
        return web.json_response(grant_view(grant, cfg, time.time()))

    # misuse standing ------------------------------------------------------------

    async def _standing(self, ws_id: str, cfg: Config) -> tuple[Standing, StandingView, float]:
        if await self.read.workspace(ws_id) is None:
            raise NotFound(f"workspace {ws_id} not found")
        standing = await self.read.standing(ws_id)
        now = time.time()
        return standing, evaluate_standing(standing, cfg.misuse, now), now

    async def _standing_answer(self, ws_id: str, cfg: Config, status: int = 200) -> web.Response:
        standing, view, now = await self._standing(ws_id, cfg)
        answer = describe(view, standing, window=cfg.misuse.window_seconds, now=now, time=rfc3339)
        return web.json_response(answer, status=status)

    async def add_flag(self, request: web.Request) -> web.Response:
        cfg, actor = self._need(request, "operator")
        body = await _body(request, ("category", "severity", "source"), ("note",))
        category = body["category"]
        if not isinstance(category, str) or not _CATEGORY.fullmatch(category):
            raise ApiError(
                "invalid_body",
                "category must be 1-64 lower-case letters, digits, '.', '_' or '-'",
                "category",
            )
        severity = body["severity"]
        if not isinstance(severity, int) or isinstance(severity, bool):
            raise ApiError("invalid_body", "severity must be an integer", "severity")
        if not 1 <= severity <= MAX_SEVERITY:
            raise ApiError(
                "invalid_body", f"severity must be between 1 and {MAX_SEVERITY}", "severity"
            )
        source = _check_id(body["source"], "source")
        if source == UPSTREAM_SOURCE:
            raise ApiError(
                "invalid_body",
                f"source {UPSTREAM_SOURCE!r} is reserved for the upstream's safety header",
                "source",
            )
        note = _check_text(body["note"], "note") if body.get("note") is not None else None
        ws_id = request.match_info["ws"]
        flag = Flag(time.time(), category, severity, source, note)
        await self.writes.add_flag(actor, ws_id, flag, cfg.misuse)
        return await self._standing_answer(ws_id, cfg, 201)

    async def get_standing(self, request: web.Request) -> web.Response:
        cfg, _ = self._need(request, "read")
        return await self._standing_answer(request.match_info["ws"], cfg)

    async def clear_standing(self, request: web.Request) -> web.Response:
        cfg, actor = self._need(request, "operator")
        body = await _body(request, ("reason",), ())
        reason = _check_text(body["reason"], "reason")
        ws_id = request.match_info["ws"]
        await self.writes.clear_standing(actor, ws_id, reason, cfg.misuse)
        return await self._standing_answer(ws_id, cfg)

    # usage -----------------------------------------------------------------------

    async def get_usage(self, request: web.Request) -> web.Response:
        """All-time totals; with ``from`` and/or ``to`` (UTC days, ``YYYY-MM-DD``, both
        included; ``to`` defaults to today, ``from`` to ``to``) the sum over those days and each
        day."""
        cfg, _ = self._need(request, "read")
        q = _query(request, ("from", "to"))
        ws_id = request.match_info["ws"]
        if await self.read.workspace(ws_id) is None:
            raise NotFound(f"workspace {ws_id} not found")
        store = self.ctx.usage or UsageStore(self.redis)
        if not q:
            return web.json_response({"workspace": ws_id, **await store.read(ws_id)})
        last = _day_param(q, "to", day_of(time.time()))
        first = _day_param(q, "from", last)
        if first > last:
            raise ApiError("invalid_body", "from must not be after to", "from")
        days = days_between(first, last)
        if len(days) > MAX_USAGE_DAYS:
            raise ApiError("invalid_body", f"at most {MAX_USAGE_DAYS} days at once", "from")
        per_day = await store.read_days(ws_id, days)
        answer = {
            "workspace": ws_id,
            "from": first,
            "to": last,
            "retention_days": cfg.usage.retention_days,
            **sum_views(per_day),
            "days": per_day,
        }
        return web.json_response(answer)

    # config ----------------------------------------------------------------------

    async def reload_config(self, request: web.Request) -> web.Response:
        self._need(request, "operator")
        await _body(request, (), ())
        if self.ctx.reload is None:
            raise ApiError("internal_error", "this process has no config reload")
        answer = await self.ctx.reload()
        if answer.get("result") == "error":
            errors = answer.get("errors") or []
            first = errors[0].get("message") if errors and isinstance(errors[0], dict) else None
            message = "the configuration is not valid; nothing changed"
            if first:
                message += f": {first}"
                if len(errors) > 1:
                    message += f" (and {len(errors) - 1} more)"
            return _error("invalid_config", message, errors=errors, version=answer.get("version"))
        return web.json_response(answer)

    # explain and audit ----------------------------------------------------------

    async def explain(self, request: web.Request) -> web.Response:
        cfg, _ = self._need(request, "read")
        q = _query(request, ("key_id", "workspace", "product", "model"))
        if ("key_id" in q) == ("workspace" in q):
            raise ApiError("invalid_body", "give exactly one of key_id and workspace", "key_id")
        product = q.get("product")
        if product is None or product not in cfg.products:
            raise ApiError(
                "invalid_body",
                f"product must be one of {', '.join(cfg.products)}",
                "product",
            )
        answer = await explain(
            self.redis,
            cfg,
            product=product,
            model=q.get("model") or None,
            now=time.time(),
            key_id=q.get("key_id"),
            workspace=q.get("workspace"),
        )
        return web.json_response(answer)

    async def audit(self, request: web.Request) -> web.Response:
        self._need(request, "read")
        q = _query(request, ("after", "limit"))
        after = _int_param(q, "after", 0, 0, 2**62)
        limit = _int_param(q, "limit", 100, 1, MAX_AUDIT_PAGE)
        head_raw: dict[Any, Any] = await self.redis.hgetall(AUDIT_HEAD)
        entries = await read_entries(self.redis, after, limit)
        head = {
            "seq": int(head_raw.get(b"seq", b"0")),
            "hash": head_raw[b"hash"].decode() if b"hash" in head_raw else None,
        }
        return web.json_response({"entries": entries, "head": head})


def admin_app(ctx: AdminContext) -> web.Application:
    """Every /admin/v1/* route behind the token middleware.

    Routes are absolute, so this is the admin listener's root app: routes added beside it
    (``/healthz``, ``/readyz``, ``/metrics``) are not guarded by the admin tokens.
    """
    api = AdminAPI(ctx)
    app = web.Application(middlewares=[api.middleware], client_max_size=1024 * 1024)
    p = PREFIX
    app.router.add_post(f"{p}/orgs", api.create_org)
    app.router.add_get(f"{p}/orgs/{{org}}", api.get_org)
    app.router.add_patch(f"{p}/orgs/{{org}}", api.patch_org)
    app.router.add_post(f"{p}/orgs/{{org}}/{{action:suspend|reinstate}}", api.org_suspension)
    app.router.add_post(f"{p}/workspaces", api.create_workspace)
    app.router.add_post(
        f"{p}/workspaces/{{ws}}/{{action:suspend|reinstate}}", api.workspace_suspension
    )
    app.router.add_post(f"{p}/workspaces/{{ws}}/keys", api.issue_key)
    app.router.add_post(f"{p}/workspaces/{{ws}}/flags", api.add_flag)
    app.router.add_get(f"{p}/workspaces/{{ws}}/standing", api.get_standing)
    app.router.add_post(f"{p}/workspaces/{{ws}}/standing/clear", api.clear_standing)
    app.router.add_get(f"{p}/workspaces/{{ws}}/usage", api.get_usage)
    app.router.add_delete(f"{p}/keys/{{key_id}}", api.revoke_key)
    app.router.add_post(f"{p}/grants", api.create_grant)
    app.router.add_get(f"{p}/grants", api.list_grants)
    app.router.add_get(f"{p}/grants/{{grant_id}}", api.get_grant)
    app.router.add_post(f"{p}/grants/{{grant_id}}/approve", api.approve_grant)
    app.router.add_post(f"{p}/grants/{{grant_id}}/enable", api.enable_grant)
    app.router.add_post(
        f"{p}/grants/{{grant_id}}/{{action:suspend|reinstate|revoke}}", api.grant_lifecycle
    )
    app.router.add_get(f"{p}/explain", api.explain)
    app.router.add_get(f"{p}/audit", api.audit)
    app.router.add_post(f"{p}/config/reload", api.reload_config)
    return app
