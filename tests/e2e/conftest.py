"""End-to-end fixtures: real ``access-proxy serve`` processes, the mock upstream as a subprocess,
the session Redis, and facts seeded through ``proxy.store.writes.Writes`` from the test process.

One mock upstream and one proxy (``stack``) serve the whole e2e session; tests that stop a process
or need another one start their own with :func:`start_serve`. Every test seeds its own org,
workspaces and keys (random ids), so tests never share entitlement facts.

Helpers (importable as ``from tests.e2e.conftest import ...``): :class:`ServeProcess`,
:func:`start_serve`, :class:`Seeder`, :func:`request`, :func:`assert_error`,
:func:`metric_samples`, :func:`mock_requests`, :func:`mock_disconnects`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from proxy.errors import CODES
from proxy.identity import parse_peppers
from proxy.policy.grants import Grant
from proxy.redis_server import RedisServer
from proxy.store.topology import Topology
from proxy.store.writes import Actor, Writes
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
BASE_CONFIG = REPO / "config" / "proxy.yaml"

PEPPER = "v1:e2e-pepper-0123456789abcdefghijkl"
UPSTREAM_SECRET = "upstream-secret"
MAX_BODY_BYTES = 65536
SLOW_FIRST_BYTE_S = 0.5
START_DEADLINE_S = 30.0
STOP_DEADLINE_S = 30.0
PREVIEW = "gpt-5.6-preview"
ALPHA = "gpt-5.5-alpha"
REQUIRED_APPROVALS = {PREVIEW: ("provider", "government"), ALPHA: ("provider",)}
NOT_FOUND_MESSAGE = CODES["model_not_found"].message
ACTOR = Actor("e2e-seed", "e2e")


# ---------------------------------------------------------------------------- processes


def _http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


@dataclass
class MockProcess:
    """``python -m proxy.mock_upstream`` on a port of its own."""

    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_mock(log_dir: Path) -> MockProcess:
    """Start the mock upstream and wait until it answers ``GET /v1/models``."""
    for _ in range(3):
        port = free_port()
        log = (log_dir / f"mock-{port}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.mock_upstream", "--port", str(port)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        mock = MockProcess(proc, port)
        deadline = time.monotonic() + START_DEADLINE_S
        while proc.poll() is None and time.monotonic() < deadline:
            if _http_status(f"{mock.url}/v1/models") == 200:
                return mock
            time.sleep(0.05)
        mock.stop()
    raise RuntimeError(f"the mock upstream did not start; see {log_dir}")


def _merge(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def proxy_config(
    *,
    upstream_url: str,
    dead_upstream_url: str,
    data_port: int,
    admin_port: int,
    state_dir: Path,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """config/proxy.yaml with loopback ports, the mock upstream, and two extra routes:
    ``/slow/v1/`` (a short time-to-first-byte) and ``/dead/v1/`` (nothing listens)."""
    doc: dict[str, Any] = yaml.safe_load(BASE_CONFIG.read_text())
    doc["listen"] = {"host": "127.0.0.1", "port": data_port}
    doc["admin"]["listen"] = {"host": "127.0.0.1", "port": admin_port}
    doc["upstreams"]["models"]["url"] = upstream_url
    doc["upstreams"]["slow"] = {
        "url": upstream_url,
        "api_key_env": "UPSTREAM_API_KEY",
        "timeouts": {"connect_s": 2, "first_byte_s": SLOW_FIRST_BYTE_S, "idle_s": 2},
    }
    doc["upstreams"]["dead"] = {
        "url": dead_upstream_url,
        "api_key_env": "UPSTREAM_API_KEY",
        "timeouts": {"connect_s": 2, "first_byte_s": 2, "idle_s": 2},
    }
    doc["routes"] += [
        {
            "path_prefix": f"/{name}/v1/",
            "product": "api",
            "upstream": name,
            "rewrite_prefix": "/v1/",
        }
        for name in ("slow", "dead")
    ]
    doc["limits"] = {"max_body_bytes": MAX_BODY_BYTES}
    # The 50 ms default is for production hardware; on a loaded test machine a slow answer
    # would turn a cache miss into 503 and make the suite flaky. An outage still fails fast:
    # a stopped Redis refuses connections at once.
    doc["redis"]["timeout_ms"] = 1000
    doc["state_dir"] = str(state_dir)
    doc["shutdown_grace_s"] = 10
    return _merge(doc, overrides or {})


@dataclass
class ServeProcess:
    """One ``access-proxy serve`` process."""

    proc: subprocess.Popen[bytes]
    data_port: int
    admin_port: int
    config_path: Path
    log_path: Path

    @property
    def data_url(self) -> str:
        return f"http://127.0.0.1:{self.data_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        """Send SIGTERM (graceful drain) without waiting."""
        self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float = STOP_DEADLINE_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"serve did not exit within {timeout} s:\n{self.log()}") from None

    def stop(self) -> int:
        """SIGTERM and wait; the exit code."""
        if self.proc.poll() is None:
            self.terminate()
        return self.wait_exit()


def serve_command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config_path)]


def start_serve(
    workdir: Path,
    *,
    upstream_url: str,
    redis_url: str,
    dead_upstream_url: str,
    overrides: Mapping[str, Any] | None = None,
    name: str = "proxy",
) -> ServeProcess:
    """Write a config into ``workdir``, start ``serve`` on free ports, wait for ``/readyz``."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        {
            "ACCESS_PROXY_PEPPER": PEPPER,
            "REDIS_URL": redis_url,
            "UPSTREAM_API_KEY": UPSTREAM_SECRET,
            "ACCESS_PROXY_LOG_LEVEL": "WARNING",
        }
    )
    env.pop("ACCESS_PROXY_WORKER", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    for attempt in range(3):
        data_port, admin_port = free_port(), free_port()
        doc = proxy_config(
            upstream_url=upstream_url,
            dead_upstream_url=dead_upstream_url,
            data_port=data_port,
            admin_port=admin_port,
            state_dir=workdir / f"{name}-state",
            overrides=overrides,
        )
        config_path = workdir / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        log_path = workdir / f"{name}-{attempt}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                serve_command(config_path),
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        serve = ServeProcess(proc, data_port, admin_port, config_path, log_path)
        deadline = time.monotonic() + START_DEADLINE_S
        while proc.poll() is None:
            if _http_status(f"{serve.admin_url}/readyz") == 200:
                return serve
            if time.monotonic() >= deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"serve not ready within {START_DEADLINE_S} s:\n{serve.log()}")
            time.sleep(0.05)
        if "address already in use" not in serve.log().lower():
            raise RuntimeError(f"serve exited with {proc.returncode}:\n{serve.log()}")
    raise RuntimeError("serve could not bind free ports in three tries")


@dataclass
class Stack:
    """The shared e2e world: the mock upstream, one proxy, and the Redis behind it."""

    mock: MockProcess
    proxy: ServeProcess
    redis_url: str
    dead_upstream_url: str
    workdir: Path

    def start_serve(
        self,
        name: str,
        *,
        redis_url: str | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> ServeProcess:
        """Another proxy on the same mock upstream (and, unless given, the same Redis)."""
        return start_serve(
            self.workdir,
            upstream_url=self.mock.url,
            redis_url=redis_url or self.redis_url,
            dead_upstream_url=self.dead_upstream_url,
            overrides=overrides,
            name=f"{name}-{uuid.uuid4().hex[:6]}",
        )


@pytest.fixture(scope="session")
def dead_upstream_url() -> Iterator[str]:
    """A loopback port that is bound but never listens: connecting to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="session")
def stack(
    redis_server: RedisServer,
    dead_upstream_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("e2e")
    mock = start_mock(workdir)
    try:
        proxy = start_serve(
            workdir,
            upstream_url=mock.url,
            redis_url=redis_server.url,
            dead_upstream_url=dead_upstream_url,
        )
        try:
            yield Stack(mock, proxy, redis_server.url, dead_upstream_url, workdir)
        finally:
            code = proxy.stop()
            assert code == 0, f"serve exited with {code} on SIGTERM:\n{proxy.log()}"
    finally:
        mock.stop()


# ---------------------------------------------------------------------------- seeding

PAST = -60.0  # enable_at relative to now: enabled a minute ago


@dataclass(frozen=True)
class Tenant:
    """A seeded org with one workspace and one key of that workspace."""

    org: str
    workspace: str
    key_id: str
    key: str


class Seeder:
    """Facts written through ``Writes`` (audited, invalidation published) on the proxy's Redis."""

    def __init__(self, redis_url: str) -> None:
        self.topology = Topology(redis_url)
        self.client = self.topology.client(None)  # the admin state, on any topology
        self.data = self.topology.data_client(None)  # per-workspace keys (usage)
        self.writes = Writes(self.client)
        self.peppers = parse_peppers(PEPPER)

    async def close(self) -> None:
        await self.topology.aclose()

    async def org(self) -> str:
        org_id = "org-" + uuid.uuid4().hex[:10]
        await self.writes.create_org(ACTOR, org_id, org_id)
        return org_id

    async def workspace(self, org_id: str) -> str:
        ws_id = "ws-" + uuid.uuid4().hex[:10]
        await self.writes.create_workspace(ACTOR, ws_id, org_id, ws_id)
        return ws_id

    async def key(self, ws_id: str) -> tuple[str, str]:
        """A new key of ``ws_id``: ``(key_id, key)``."""
        key_id, key = await self.writes.issue_key(ACTOR, ws_id, "e2e", self.peppers)
        return key_id, key

    async def tenant(self, org_id: str | None = None) -> Tenant:
        org_id = org_id or await self.org()
        ws_id = await self.workspace(org_id)
        key_id, key = await self.key(ws_id)
        return Tenant(org_id, ws_id, key_id, key)

    async def grant(
        self,
        subject: str,
        program: str = PREVIEW,
        product: str = "api",
        *,
        models: tuple[str, ...] | None = None,
        approvals: tuple[str, ...] | None = None,
        enable_in: float | None = PAST,
        expires_in: float | None = None,
    ) -> str:
        """A grant approved by ``approvals`` (default: every required role, distinct reviewers),
        enabled at now + ``enable_in`` s (None: not enabled), expiring at now + ``expires_in``."""
        now = time.time()
        grant = await self.writes.create_grant(
            ACTOR,
            program,
            product,
            subject,
            models,
            None if expires_in is None else now + expires_in,
        )
        roles = REQUIRED_APPROVALS[program] if approvals is None else approvals
        for role in roles:
            reviewer = Actor(f"e2e-{role}-review", ACTOR.config_version)
            await self.writes.approve_grant(reviewer, grant.grant_id, role, f"reviewer-{role}")
        if enable_in is not None:
            await self.writes.enable_grant(ACTOR, grant.grant_id, now + enable_in)
        return grant.grant_id

    async def grant_action(self, grant_id: str, action: str) -> Grant:
        """``suspend``, ``reinstate`` or ``revoke``."""
        return await self.writes.apply_grant_action(ACTOR, grant_id, action, "e2e")

    async def suspend_workspace(self, ws_id: str) -> None:
        await self.writes.set_workspace_suspended(ACTOR, ws_id, True, "e2e")

    async def suspend_org(self, org_id: str) -> None:
        await self.writes.set_org_suspended(ACTOR, org_id, True, "e2e")

    async def revoke_key(self, key_id: str) -> None:
        await self.writes.revoke_key(ACTOR, key_id)


@pytest.fixture
async def seed(stack: Stack) -> AsyncIterator[Seeder]:
    seeder = Seeder(stack.redis_url)
    try:
        yield seeder
    finally:
        await seeder.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


# ---------------------------------------------------------------------------- HTTP helpers


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], **extra}


async def request(
    session: aiohttp.ClientSession,
    base_url: str,
    path: str = "/v1/chat/completions",
    *,
    key: str | None = None,
    model: str | None = None,
    json_body: Any = None,
    data: bytes | None = None,
    method: str | None = None,
    headers: Mapping[str, str] | None = None,
    api_key_header: bool = False,
) -> Answer:
    """One request to the proxy; ``model`` alone makes a chat body for it."""
    h: dict[str, str] = dict(headers or {})
    if key is not None:
        if api_key_header:
            h["api-key"] = key
        else:
            h["Authorization"] = f"Bearer {key}"
    if json_body is None and data is None and model is not None:
        json_body = chat_body(model)
    if json_body is not None:
        data = json.dumps(json_body).encode()
        h.setdefault("Content-Type", "application/json")
    verb = method or ("POST" if data is not None else "GET")
    async with session.request(verb, base_url + path, data=data, headers=h) as resp:
        body = await resp.read()
        return Answer(resp.status, CIMultiDict(resp.headers), body)


def assert_error(answer: Answer, code: str, message: str | None = None) -> dict[str, Any]:
    """The answer is the OpenAI-shaped error for ``code`` (status, type, code, x-request-id)."""
    entry = CODES[code]
    assert answer.status == entry.status, (answer.status, answer.body[:500])
    assert answer.headers.get("x-request-id"), answer.headers
    assert answer.headers.get("Content-Type", "").startswith("application/json")
    doc = answer.json()
    error = doc["error"]
    assert set(error) == {"message", "type", "code", "param"}, error
    assert error["code"] == code, error
    assert error["type"] == entry.type, error
    assert isinstance(error["message"], str) and error["message"]
    if message is not None:
        assert error["message"] == message, error
    return dict(error)


def assert_allowed(answer: Answer) -> Any:
    assert answer.status == 200, (answer.status, answer.body[:500])
    assert answer.headers.get("x-request-id"), answer.headers
    return answer.json()


async def metric_samples(
    session: aiohttp.ClientSession, admin_url: str
) -> list[tuple[str, dict[str, str], float]]:
    """Every sample on ``/metrics``: ``(name, labels, value)``."""
    async with session.get(admin_url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def requests_total(samples: list[tuple[str, dict[str, str], float]], **labels: str) -> float:
    """Sum of ``access_proxy_requests_total`` over samples matching ``labels``."""
    return sum(
        value
        for name, got, value in samples
        if name == "access_proxy_requests_total" and all(got.get(k) == v for k, v in labels.items())
    )


async def mock_requests(
    session: aiohttp.ClientSession, mock_url: str, request_id: str | None = None
) -> list[dict[str, Any]]:
    """What the mock upstream received (optionally for one ``x-request-id``), oldest first."""
    params = {"request_id": request_id} if request_id else {}
    async with session.get(mock_url + "/_mock/requests", params=params) as resp:
        doc = await resp.json()
    found: list[dict[str, Any]] = doc["requests"]
    return found


async def mock_disconnects(session: aiohttp.ClientSession, mock_url: str) -> dict[str, Any]:
    async with session.get(mock_url + "/_mock/disconnects") as resp:
        doc = await resp.json()
    found: dict[str, Any] = doc["disconnects"]
    return found


def header_values(recorded: Mapping[str, Any], name: str) -> list[str]:
    """Every value of header ``name`` in a request recorded by the mock."""
    return [v for k, v in recorded["headers"] if k.lower() == name.lower()]


async def raw_exchange(port: int, raw: bytes, timeout: float = 10.0) -> tuple[int, bytes, bytes]:
    """Send raw bytes on a fresh connection; read until the server closes it.

    Returns ``(status, head, body)``; the request should carry ``Connection: close`` unless the
    server is expected to close on its own.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(timeout):
            data = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, head, body


def head_headers(head: bytes) -> dict[str, list[str]]:
    """Header values by lowercased name from a raw response head."""
    out: dict[str, list[str]] = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        out.setdefault(name.strip().lower(), []).append(value.strip())
    return out
