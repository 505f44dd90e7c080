"""The two first-contact paths: ``access-proxy demo`` as a user runs it, and ``serve`` with the
default embedded Redis, whose grants must survive a restart of the proxy."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.conftest import free_port
from tests.e2e.conftest import REPO, Stack, chat_body, proxy_config

OPS_TOKEN = "embedded-ops-token-0123456789"
GOV_TOKEN = "embedded-gov-token-0123456789"


def _read_until(proc: subprocess.Popen[str], marker: str, deadline_s: float) -> str:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            return "".join(lines)
    raise AssertionError(f"{marker!r} not printed in time:\n{''.join(lines)}")


def test_demo_seeds_through_the_admin_api_and_shows_every_case(tmp_path: Path) -> None:
    port, admin_port, upstream_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "ACCESS_PROXY_PEPPER")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy.cli",
            "demo",
            "--port",
            str(port),
            "--admin-port",
            str(admin_port),
            "--upstream-port",
            str(upstream_port),
            "--state-dir",
            str(tmp_path / "demo"),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out = _read_until(proc, "Ctrl-C stops everything.", 60)
        checked = [line for line in out.splitlines() if re.match(r"\s+(ok|\?\?) ", line)]
        assert len(checked) >= 10, out
        assert all(line.strip().startswith("ok ") for line in checked), out
        # Every deny code of the demo shows, and the operator commands it ran are printed.
        for code in (
            "invalid_api_key",
            "workspace_suspended",
            "product_unavailable",
            "model_not_found",
            "access_pending_review",
            "access_not_yet_enabled",
            "access_suspended",
        ):
            assert code in out, code
        assert "access-proxy admin grants approve" in out
        # The ineligible org's grant request is refused, and shown so.
        assert (
            "grants request --program gpt-5.6-preview --product api --subject org:hooli"
            "   # refused: 422 not_eligible"
        ) in out, out
        assert "ok realtime 404 model_not_found" in out, out
        assert "ok multipart 404 model_not_found" in out, out
        # A workspace spends its token budget: allowed answers, then a 429 with retry-after.
        (line,) = [ln for ln in out.splitlines() if "token limit:" in ln and "->" in ln]
        assert line.strip().startswith("ok ") and "200 (" in line, line
        assert "429 rate_limit_exceeded, retry-after" in line, line
        assert f"base_url='http://127.0.0.1:{port}/v1'" in out
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


async def _admin(
    session: aiohttp.ClientSession,
    url: str,
    method: str,
    path: str,
    body: Any,
    token: str = OPS_TOKEN,
) -> Any:
    async with session.request(
        method, url + path, json=body, headers={"authorization": f"Bearer {token}"}
    ) as resp:
        doc = await resp.json()
        assert resp.status < 300, (path, resp.status, doc)
        return doc


def _start(config_path: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config_path)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def _wait_ready(session: aiohttp.ClientSession, admin_url: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            async with session.get(admin_url + "/readyz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await _pause()
    raise AssertionError(f"not ready:\n{log.read_text()}")


async def _pause() -> None:
    await asyncio.sleep(0.05)


async def test_embedded_redis_keeps_grants_across_a_restart(tmp_path: Path, stack: Stack) -> None:
    data_port, admin_port = free_port(), free_port()
    doc = proxy_config(
        upstream_url=stack.mock.url,
        dead_upstream_url=stack.dead_upstream_url,
        data_port=data_port,
        admin_port=admin_port,
        state_dir=tmp_path / "state",
    )
    doc["redis"] = {"url": "embedded", "timeout_ms": 1000}
    doc["admin"]["tokens"] = [
        {
            "name": name,
            "sha256": hashlib.sha256(token.encode()).hexdigest(),
            "roles": ["operator", f"approver:{role}"],
        }
        for name, token, role in (
            ("ops", OPS_TOKEN, "provider"),
            ("gov", GOV_TOKEN, "government"),
        )
    ]
    config_path = tmp_path / "proxy.yaml"
    config_path.write_text(yaml.safe_dump(doc))
    # No REDIS_URL and no pepper: the embedded Redis and a generated pepper in the state dir.
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "ACCESS_PROXY_PEPPER")}
    env["UPSTREAM_API_KEY"] = "upstream-secret"
    log = tmp_path / "serve.log"
    admin_url, data_url = f"http://127.0.0.1:{admin_port}", f"http://127.0.0.1:{data_port}"

    async with aiohttp.ClientSession() as session:
        proc = _start(config_path, env, log)
        try:
            await _wait_ready(session, admin_url, log)
            await _admin(
                session,
                admin_url,
                "POST",
                "/admin/v1/orgs",
                {"id": "keep", "account_representative": "Dana Reyes"},
            )
            await _admin(
                session,
                admin_url,
                "POST",
                "/admin/v1/workspaces",
                {"id": "keep-ws", "org_id": "keep"},
            )
            key = (
                await _admin(session, admin_url, "POST", "/admin/v1/workspaces/keep-ws/keys", {})
            )["key"]
            grant = await _admin(
                session,
                admin_url,
                "POST",
                "/admin/v1/grants",
                {"program": "gpt-5.6-preview", "product": "api", "subject": "org:keep"},
            )
            gid = grant["grant_id"]
            for role, reviewer, token in (
                ("provider", "alice", OPS_TOKEN),
                ("government", "grace", GOV_TOKEN),
            ):
                await _admin(
                    session,
                    admin_url,
                    "POST",
                    f"/admin/v1/grants/{gid}/approve",
                    {"role": role, "reviewer": reviewer},
                    token,
                )
            await _admin(session, admin_url, "POST", f"/admin/v1/grants/{gid}/enable", {})
            headers = {"authorization": f"Bearer {key}"}
            async with session.post(
                data_url + "/v1/chat/completions", json=chat_body("gpt-5.6-sol"), headers=headers
            ) as resp:
                assert resp.status == 200
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        assert (tmp_path / "state" / "redis" / "appendonly.aof").exists()
        assert (tmp_path / "state" / "pepper").exists()

        proc = _start(config_path, env, log)
        try:
            await _wait_ready(session, admin_url, log)
            async with session.post(
                data_url + "/v1/chat/completions", json=chat_body("gpt-5.6-sol"), headers=headers
            ) as resp:
                assert resp.status == 200, await resp.text()
            state = await _admin(session, admin_url, "GET", f"/admin/v1/grants/{gid}", None)
            assert state["state"] == "enabled"
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
