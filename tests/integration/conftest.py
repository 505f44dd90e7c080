"""Shared helpers of the integration tests: a live admin API on loopback with named tokens
(``Admin``, ``start_admin``, the ``admin`` fixture), a data plane beside it (``start_plane``),
the admin CLI as a subprocess (``run_cli``) and the error-shape assertion.

Import them as ``from tests.integration.conftest import ...``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from aiohttp import web

from proxy import config
from proxy.admin.api import AdminContext, admin_app
from proxy.admin.client import TOKEN_ENV, URL_ENV
from proxy.dataplane.app import DataPlane, Hooks
from proxy.dataplane.client import UpstreamPool
from proxy.identity import parse_peppers
from proxy.snapshot import Holder
from proxy.store.cache import FactCache
from proxy.store.connection import Breaker, Gate, make_client
from proxy.store.entitlements import Entitlements
from proxy.store.writes import Writes

REPO = Path(__file__).resolve().parents[2]

TOKENS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ops": ("ops-token-0123456789abcdef", ("operator",)),
    "provider-review": ("provider-token-0123456789", ("approver:provider",)),
    "gov-review": ("gov-token-0123456789abcdef", ("approver:government",)),
    "dashboards": ("viewer-token-0123456789abc", ("viewer",)),
    "both-review": ("both-token-0123456789abcde", ("approver:provider", "approver:government")),
}
PEPPER = "v1:pepper-for-admin-tests-0123456789"
RFC3339_Z = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z")


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def config_text(upstream_url: str = "http://127.0.0.1:9") -> str:
    tokens = "\n".join(
        f'    - {{name: {name}, sha256: "{sha(tok)}", roles: [{", ".join(roles)}]}}'
        for name, (tok, roles) in TOKENS.items()
    )
    return f"""
admin:
  tokens:
{tokens}
upstreams:
  models: {{url: "{upstream_url}"}}
routes:
  - {{path_prefix: /v1/, product: api, upstream: models}}
  - {{path_prefix: /codex/v1/, product: codex, upstream: models, rewrite_prefix: /v1/}}
  - {{path_prefix: /chatgpt/v1/, product: chatgpt, upstream: models, rewrite_prefix: /v1/}}
programs:
  gpt-5.6-preview:
    models: [gpt-5.6-sol, gpt-5.6-terra, gpt-5.6-luna]
    required_approvals: [provider, government]
    phases: {{api: preview, codex: preview, chatgpt: closed}}
  gpt-5.5-alpha:
    models: [gpt-5.5-alpha]
    required_approvals: [provider]
    phases: {{api: preview, codex: ga, chatgpt: closed}}
unlisted_models: allow
"""


@dataclass
class Admin:
    """A live admin app on loopback and a client session to call it with a named token."""

    url: str
    session: aiohttp.ClientSession
    redis: redis.asyncio.Redis
    cfg: config.Config
    holder: Holder

    async def call(
        self,
        token: str | None,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, str] | None = None,
        raw_auth: str | None = None,
    ) -> tuple[int, Any]:
        headers = {}
        if raw_auth is not None:
            headers["authorization"] = raw_auth
        elif token is not None:
            headers["authorization"] = f"Bearer {TOKENS[token][0]}"
        async with self.session.request(
            method, self.url + path, json=body, params=params, headers=headers
        ) as resp:
            text = await resp.text()
            return resp.status, (await resp.json(content_type=None)) if text else None

    async def ok(
        self, token: str, method: str, path: str, body: Any = None, status: int = 200, **kw: Any
    ) -> Any:
        got, data = await self.call(token, method, path, body, **kw)
        assert got == status, (got, data)
        return data

    # Shortcuts for setting up facts through the API itself.
    async def org(self, org_id: str) -> None:
        await self.ok("ops", "POST", "/admin/v1/orgs", {"id": org_id}, 201)

    async def workspace(self, ws_id: str, org_id: str) -> None:
        await self.ok("ops", "POST", "/admin/v1/workspaces", {"id": ws_id, "org_id": org_id}, 201)

    async def key(self, ws_id: str) -> dict[str, Any]:
        data: dict[str, Any] = await self.ok(
            "ops", "POST", f"/admin/v1/workspaces/{ws_id}/keys", {"name": "k"}, 201
        )
        return data

    async def grant(
        self, subject: str, program: str = "gpt-5.6-preview", product: str = "api", **extra: Any
    ) -> dict[str, Any]:
        body = {"program": program, "product": product, "subject": subject, **extra}
        data: dict[str, Any] = await self.ok("ops", "POST", "/admin/v1/grants", body, 201)
        return data


async def start_admin(
    redis_client: redis.asyncio.Redis, upstream_url: str = "http://127.0.0.1:9"
) -> tuple[Admin, web.AppRunner]:
    cfg = config.parse(config_text(upstream_url))
    holder = Holder(cfg)
    ctx = AdminContext(holder=holder, writes=Writes(redis_client), peppers=parse_peppers(PEPPER))
    runner = web.AppRunner(admin_app(ctx), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    session = aiohttp.ClientSession()
    return Admin(f"http://127.0.0.1:{port}", session, redis_client, cfg, holder), runner


@pytest.fixture
async def admin(redis_client: redis.asyncio.Redis) -> AsyncIterator[Admin]:
    api, runner = await start_admin(redis_client)
    try:
        yield api
    finally:
        await api.session.close()
        await runner.cleanup()


def assert_error(data: Any, code: str, param: str | None = None) -> None:
    assert set(data) >= {"error"}, data
    err = data["error"]
    assert set(err) == {"message", "type", "code", "param"}, err
    assert err["code"] == code, err
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err


@dataclass
class Plane:
    """A data plane on loopback sharing the admin's config holder and Redis."""

    url: str
    dataplane: DataPlane
    session: aiohttp.ClientSession
    runner: web.ServerRunner
    redis: redis.asyncio.Redis
    pool: UpstreamPool

    async def close(self) -> None:
        await self.session.close()
        await self.pool.close()
        await self.runner.cleanup()
        await self.redis.aclose()


async def start_plane(redis_url: str, holder: Holder, hooks: Hooks | None = None) -> Plane:
    """Start a ``DataPlane`` (no cache invalidation: use fresh ids per case) on a free port."""
    data_client = make_client(redis_url, timeout_s=2.0)
    session = aiohttp.ClientSession()
    cfg = holder.current.config
    entitlements = Entitlements(
        data_client, Gate(2.0, Breaker(3, 1.0)), FactCache(cfg.cache.max_entries)
    )
    pool = UpstreamPool()
    plane = DataPlane(holder, entitlements, parse_peppers(PEPPER), pool, hooks)
    runner = web.ServerRunner(web.Server(plane.handle), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    return Plane(url, plane, session, runner, data_client, pool)


async def run_cli(
    admin: Admin, *args: str, token: str | None = "ops", via_env: bool = False
) -> tuple[int, str, str]:
    """Run the CLI; the URL and token go in flags after the command, or in the env."""
    env = {k: v for k, v in os.environ.items() if k not in (URL_ENV, TOKEN_ENV)}
    cmd = [sys.executable, "-m", "proxy.admin.cli", *args]
    if via_env:
        env[URL_ENV] = admin.url
        if token is not None:
            env[TOKEN_ENV] = TOKENS[token][0]
    else:
        cmd += ["--url", admin.url]
        if token is not None:
            cmd += ["--token", TOKENS[token][0]]
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
