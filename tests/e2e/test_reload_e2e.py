"""Hot reload end to end (SPEC §8, §7, §9) against real ``serve`` processes: every trigger (a file
written in place, written to a temporary file and renamed, ``SIGHUP``, the admin call) flips
``chatgpt`` from ``closed`` to ``preview`` and ``api`` from ``preview`` to ``ga`` without a restart;
an invalid file changes nothing; restart-only settings are reported and kept; the new version
shows on ``/readyz``, ``/metrics``, ``explain`` and the audit log; admin tokens follow the file at
once; a keep-alive connection survives; and concurrent traffic fails no request while the config
is reloaded 100 times.

Every test starts its own proxy on a config file it then rewrites. The helpers here
(:func:`launch`, :func:`rewrite_unseen`, ...) are shared with ``test_workers_e2e.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import free_port, wait_until
from tests.e2e.conftest import (
    NOT_FOUND_MESSAGE,
    PEPPER,
    PREVIEW,
    START_DEADLINE_S,
    UPSTREAM_SECRET,
    Answer,
    Seeder,
    ServeProcess,
    Stack,
    Tenant,
    assert_allowed,
    assert_error,
    chat_body,
    metric_samples,
    proxy_config,
    request,
    serve_command,
)

MODEL = "gpt-5.6-sol"
CHATGPT_PATH = "/chatgpt/v1/chat/completions"
OPS_TOKEN = "reload-e2e-operator-token"
VIEWER_TOKEN = "reload-e2e-viewer-token"
ADDED_TOKEN = "reload-e2e-added-operator-token"
# The watcher polls every 0.25 s; a reload it makes shows well within this on a loaded machine.
RELOAD_DEADLINE_S = 10.0
# An mtime this far back is never "racily clean" for the watcher, so only a real change of the
# file's signature (inode, mtime, size) makes it look at the content.
OLD_MTIME_AGE_NS = 3600 * 1_000_000_000
ZERO_FAILURE_RELOADS = 100
ZERO_FAILURE_DEADLINE_S = 40.0

Samples = list[tuple[str, dict[str, str], float]]


def token_entry(name: str, token: str, roles: list[str]) -> dict[str, Any]:
    return {"name": name, "sha256": hashlib.sha256(token.encode()).hexdigest(), "roles": roles}


# Rate limits far above what the tests send, so no answer depends on the limiter's timing.
_GENEROUS = {"requests_per_minute": 1_000_000, "burst": 100_000, "concurrent": 1000}
BASE_OVERRIDES: dict[str, Any] = {
    "admin": {
        "tokens": [
            token_entry("ops", OPS_TOKEN, ["operator"]),
            token_entry("dashboards", VIEWER_TOKEN, ["viewer"]),
        ]
    },
    "rate_limits": {"default": _GENEROUS, "programs": {PREVIEW: _GENEROUS}},
}


# ---------------------------------------------------------------------------- config files


def render(doc: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(doc), sort_keys=False)


def version_of(text: str) -> str:
    """The config version ``serve`` derives from the file's content."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def flipped(doc: Mapping[str, Any]) -> dict[str, Any]:
    """``doc`` with the preview program's ``chatgpt`` phase open and its ``api`` phase GA."""
    out = copy.deepcopy(dict(doc))
    out["programs"][PREVIEW]["phases"].update({"chatgpt": "preview", "api": "ga"})
    return out


def invalid(doc: Mapping[str, Any]) -> dict[str, Any]:
    """``doc`` with two errors: an unknown phase and a route to an unknown upstream."""
    out = flipped(doc)
    out["programs"][PREVIEW]["phases"]["codex"] = "sometimes"
    out["routes"][0]["upstream"] = "nowhere"
    return out


def write_in_place(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)


def write_by_rename(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0]


def rewrite_unseen(path: Path, text: str, pids: Iterable[int]) -> str:
    """Replace the content of ``path`` keeping its inode, size and mtime, with ``pids`` stopped
    meanwhile, so that no file watcher can notice: only an explicit trigger reloads it.

    ``text`` is padded with newlines to the old size; the padded text is returned."""
    before = os.stat(path)
    assert len(text.encode()) <= before.st_size, "the new content must not be longer"
    padded = text + "\n" * (before.st_size - len(text.encode()))
    stopped = list(pids)
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while not all(_state(pid) in ("T", "t") for pid in stopped):
            assert time.monotonic() < deadline, "the workers did not stop"
            time.sleep(0.005)
        with path.open("r+b") as f:
            f.write(padded.encode())
            f.truncate()
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    return padded


# ---------------------------------------------------------------------------- processes


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return sorted(found)


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                    inodes.add(fields[9])
    return inodes


def listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a listening socket on ``port``."""
    inodes = _listening_inodes(port)
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return True
    return False


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class ReloadableProxy:
    """A ``serve`` process (or a supervisor with workers) on a config file the test rewrites."""

    serve: ServeProcess
    doc: dict[str, Any]  # the config as first written
    text: str
    workers: int
    workdir: Path

    @property
    def path(self) -> Path:
        return self.serve.config_path

    @property
    def version(self) -> str:
        return version_of(self.text)

    def worker_pids(self) -> list[int]:
        """The processes that serve: the process itself, or the supervisor's workers."""
        if self.workers == 1:
            return [self.serve.proc.pid]
        return children(self.serve.proc.pid)

    def metrics_dir(self) -> Path:
        """The shared Prometheus multiprocess directory of the workers."""
        found = list((self.workdir / "tmp").glob("access-proxy-metrics-*"))
        assert len(found) == 1, found
        return found[0]


def launch(
    stack: Stack,
    workdir: Path,
    *,
    workers: int = 1,
    overrides: Mapping[str, Any] | None = None,
) -> ReloadableProxy:
    """Write a config (with an old mtime) into ``workdir`` and start ``serve`` on free ports;
    return once every worker listens on both ports and ``/readyz`` answers 200."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)
    env = dict(os.environ)
    env.update(
        {
            "ACCESS_PROXY_PEPPER": PEPPER,
            "REDIS_URL": stack.redis_url,
            "UPSTREAM_API_KEY": UPSTREAM_SECRET,
            "ACCESS_PROXY_LOG_LEVEL": "WARNING",
            "TMPDIR": str(workdir / "tmp"),
        }
    )
    env.pop("ACCESS_PROXY_WORKER", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    changes = copy.deepcopy(BASE_OVERRIDES)
    changes.update(overrides or {})
    for attempt in range(3):
        data_port, admin_port = free_port(), free_port()
        doc = proxy_config(
            upstream_url=stack.mock.url,
            dead_upstream_url=stack.dead_upstream_url,
            data_port=data_port,
            admin_port=admin_port,
            state_dir=workdir / "state",
            overrides=changes,
        )
        text = render(doc)
        config_path = workdir / "proxy.yaml"
        config_path.write_text(text)
        old = time.time_ns() - OLD_MTIME_AGE_NS
        os.utime(config_path, ns=(old, old))
        command = serve_command(config_path)
        if workers > 1:
            command += ["--workers", str(workers)]
        log_path = workdir / f"serve-{attempt}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        serve = ServeProcess(proc, data_port, admin_port, config_path, log_path)
        proxy = ReloadableProxy(serve, doc, text, workers, workdir)
        deadline = time.monotonic() + START_DEADLINE_S * workers
        while proc.poll() is None:
            pids = proxy.worker_pids()
            if (
                len(pids) == workers
                and all(listens_on(p, data_port) and listens_on(p, admin_port) for p in pids)
                and _ready(f"{serve.admin_url}/readyz")
            ):
                return proxy
            if time.monotonic() >= deadline:
                with contextlib.suppress(AssertionError):
                    serve.stop()
                raise RuntimeError(f"serve not ready within the deadline:\n{serve.log()}")
            time.sleep(0.05)
        if "address already in use" not in serve.log().lower():
            raise RuntimeError(f"serve exited with {proc.returncode}:\n{serve.log()}")
    raise RuntimeError("serve could not bind free ports in three tries")


# ---------------------------------------------------------------------------- HTTP helpers


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def admin_reload(
    http: aiohttp.ClientSession, proxy: ReloadableProxy, token: str = OPS_TOKEN
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        proxy.serve.admin_url + "/admin/v1/config/reload", headers=bearer(token)
    ) as resp:
        return resp.status, await resp.json()


async def readyz_version(http: aiohttp.ClientSession, proxy: ReloadableProxy) -> str:
    async with http.get(proxy.serve.admin_url + "/readyz") as resp:
        doc = await resp.json()
    version: str = doc["config_version"]
    return version


async def wait_for_version(
    http: aiohttp.ClientSession, proxy: ReloadableProxy, version: str
) -> None:
    async def active() -> bool:
        return await readyz_version(http, proxy) == version

    await wait_until(active, RELOAD_DEADLINE_S, 0.02, f"config version {version} active")


def metric(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        value
        for got_name, got, value in samples
        if got_name == name and all(got.get(k) == v for k, v in labels.items())
    )


async def reloads(http: aiohttp.ClientSession, proxy: ReloadableProxy, result: str) -> float:
    samples = await metric_samples(http, proxy.serve.admin_url)
    return metric(samples, "access_proxy_config_reloads_total", result=result)


@dataclass(frozen=True)
class Tenants:
    chat: Tenant  # a chatgpt grant for the preview program
    plain: Tenant  # no grant at all
    api: Tenant  # an api grant for the preview program


async def seed_tenants(seed: Seeder) -> Tenants:
    chat = await seed.tenant()
    await seed.grant(f"workspace:{chat.workspace}", PREVIEW, "chatgpt")
    api = await seed.tenant()
    await seed.grant(f"workspace:{api.workspace}", PREVIEW, "api")
    return Tenants(chat, await seed.tenant(), api)


@pytest.fixture
async def tenants(seed: Seeder) -> Tenants:
    return await seed_tenants(seed)


async def assert_old_phases(http: aiohttp.ClientSession, url: str, tenants: Tenants) -> None:
    """chatgpt closed: 403 product_unavailable; api preview without a grant: 404."""
    answer = await request(http, url, CHATGPT_PATH, key=tenants.chat.key, model=MODEL)
    assert_error(answer, "product_unavailable")
    answer = await request(http, url, key=tenants.plain.key, model=MODEL)
    assert_error(answer, "model_not_found", NOT_FOUND_MESSAGE)


async def assert_new_phases(http: aiohttp.ClientSession, url: str, tenants: Tenants) -> None:
    """chatgpt preview: the grant holder passes; api GA: a workspace without a grant passes."""
    assert_allowed(await request(http, url, CHATGPT_PATH, key=tenants.chat.key, model=MODEL))
    assert_allowed(await request(http, url, key=tenants.plain.key, model=MODEL))


@pytest.fixture
def proxy(stack: Stack, tmp_path: Path) -> Iterator[ReloadableProxy]:
    started = launch(stack, tmp_path / "proxy")
    try:
        yield started
    finally:
        code = started.serve.stop()
        assert code == 0, f"serve exited with {code}:\n{started.serve.log()}"


# ---------------------------------------------------------------------------- the triggers


async def test_file_written_in_place_flips_the_phases(
    proxy: ReloadableProxy, tenants: Tenants, http: aiohttp.ClientSession
) -> None:
    await assert_old_phases(http, proxy.serve.data_url, tenants)
    text = render(flipped(proxy.doc))
    write_in_place(proxy.path, text)
    await wait_for_version(http, proxy, version_of(text))
    await assert_new_phases(http, proxy.serve.data_url, tenants)


async def test_file_written_to_temp_and_renamed_flips_the_phases(
    proxy: ReloadableProxy, tenants: Tenants, http: aiohttp.ClientSession
) -> None:
    await assert_old_phases(http, proxy.serve.data_url, tenants)
    text = render(flipped(proxy.doc))
    write_by_rename(proxy.path, text)
    await wait_for_version(http, proxy, version_of(text))
    await assert_new_phases(http, proxy.serve.data_url, tenants)
    assert await reloads(http, proxy, "error") == 0


async def test_sighup_flips_the_phases_the_watcher_cannot_see(
    proxy: ReloadableProxy, tenants: Tenants, http: aiohttp.ClientSession
) -> None:
    await assert_old_phases(http, proxy.serve.data_url, tenants)
    ok_before = await reloads(http, proxy, "ok")
    text = rewrite_unseen(proxy.path, render(flipped(proxy.doc)), proxy.worker_pids())
    proxy.serve.proc.send_signal(signal.SIGHUP)
    await wait_for_version(http, proxy, version_of(text))
    assert await reloads(http, proxy, "ok") == ok_before + 1
    await assert_new_phases(http, proxy.serve.data_url, tenants)


async def test_admin_reload_flips_the_phases_and_names_the_changes(
    proxy: ReloadableProxy, tenants: Tenants, http: aiohttp.ClientSession
) -> None:
    await assert_old_phases(http, proxy.serve.data_url, tenants)
    text = rewrite_unseen(proxy.path, render(flipped(proxy.doc)), proxy.worker_pids())
    status, answer = await admin_reload(http, proxy)
    assert status == 200, answer
    assert answer["result"] == "ok", answer
    assert answer["version"] == version_of(text) != proxy.version
    assert answer["errors"] == [] and answer["restart_required"] == []
    changed = "\n".join(answer["changes"])
    assert f"{PREVIEW}.phases.chatgpt" in changed and f"{PREVIEW}.phases.api" in changed, changed
    # No wait: the answer comes after the swap.
    await assert_new_phases(http, proxy.serve.data_url, tenants)

    status, again = await admin_reload(http, proxy)
    assert (status, again["result"], again["version"]) == (200, "unchanged", answer["version"])


# ---------------------------------------------------------------------------- invalid and held


async def test_invalid_file_changes_nothing_and_every_error_is_located(
    proxy: ReloadableProxy, tenants: Tenants, http: aiohttp.ClientSession
) -> None:
    errors_before = await reloads(http, proxy, "error")
    write_by_rename(proxy.path, render(invalid(proxy.doc)))

    async def rejected_by_the_watcher() -> bool:
        return await reloads(http, proxy, "error") == errors_before + 1

    await wait_until(rejected_by_the_watcher, RELOAD_DEADLINE_S, 0.02)
    assert await readyz_version(http, proxy) == proxy.version
    await assert_old_phases(http, proxy.serve.data_url, tenants)

    status, answer = await admin_reload(http, proxy)
    assert status == 422, answer
    assert answer["error"]["code"] == "invalid_config", answer
    assert answer["version"] == proxy.version
    errors = answer["errors"]
    paths = {e["path"] for e in errors}
    assert {f"programs.{PREVIEW}.phases.codex", "routes[0].upstream"} <= paths, errors
    assert all(isinstance(e["line"], int) and e["line"] > 0 for e in errors), errors
    assert await reloads(http, proxy, "error") == errors_before + 2
    await assert_old_phases(http, proxy.serve.data_url, tenants)
    # Logged with their location, once per rejection (the watcher's and the admin call's).
    log = proxy.serve.log()
    for e in errors:
        where = f"config error: {proxy.path}:{e['line']}: {e['path']}: "
        assert log.count(where) == 2, (where, log)

    # A valid file afterwards is taken as usual.
    text = render(flipped(proxy.doc))
    write_by_rename(proxy.path, text)
    await wait_for_version(http, proxy, version_of(text))
    await assert_new_phases(http, proxy.serve.data_url, tenants)


async def test_restart_only_setting_is_reported_and_the_old_port_keeps_serving(
    proxy: ReloadableProxy, tenants: Tenants, http: aiohttp.ClientSession
) -> None:
    new_port = free_port()
    doc = flipped(proxy.doc)
    doc["listen"]["port"] = new_port
    text = render(doc)
    write_by_rename(proxy.path, text)
    status, answer = await admin_reload(http, proxy)
    assert status == 200, answer
    # The watcher may have taken the file first; the listener change is reported either way.
    assert answer["result"] in ("ok", "unchanged"), answer
    assert answer["version"] == version_of(text)
    held = "\n".join(answer["restart_required"])
    assert held.startswith("! listen:") and f":{new_port} " in held, answer
    assert not any(line.startswith("~ listen") for line in answer["changes"]), answer
    await assert_new_phases(http, proxy.serve.data_url, tenants)
    assert not listens_on(proxy.serve.proc.pid, new_port)
    assert listens_on(proxy.serve.proc.pid, proxy.serve.data_port)


# ---------------------------------------------------------------------------- version, tokens


async def _explain(http: aiohttp.ClientSession, proxy: ReloadableProxy, ws: str) -> Any:
    query = {"workspace": ws, "product": "chatgpt", "model": MODEL}
    async with http.get(
        proxy.serve.admin_url + "/admin/v1/explain", params=query, headers=bearer(VIEWER_TOKEN)
    ) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def _audit(http: aiohttp.ClientSession, proxy: ReloadableProxy, after: int) -> Any:
    async with http.get(
        proxy.serve.admin_url + "/admin/v1/audit",
        params={"after": str(after), "limit": "1000"},
        headers=bearer(VIEWER_TOKEN),
    ) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_new_version_on_readyz_metrics_explain_and_audit(
    proxy: ReloadableProxy, tenants: Tenants, http: aiohttp.ClientSession
) -> None:
    old = proxy.version
    assert await readyz_version(http, proxy) == old
    before = await _explain(http, proxy, tenants.chat.workspace)
    assert (before["config_version"], before["code"]) == (old, "product_unavailable")

    text = render(flipped(proxy.doc))
    new = version_of(text)
    write_by_rename(proxy.path, text)
    await wait_for_version(http, proxy, new)

    samples = await metric_samples(http, proxy.serve.admin_url)
    info = {
        labels["version"]: value
        for name, labels, value in samples
        if name == "access_proxy_config_info"
    }
    assert info.get(new) == 1 and info.get(old, 0) == 0, info
    after = await _explain(http, proxy, tenants.chat.workspace)
    assert (after["config_version"], after["allowed"]) == (new, True), after

    head = (await _audit(http, proxy, 0))["head"]["seq"]
    org = f"org-reload-{os.urandom(5).hex()}"
    async with http.post(
        proxy.serve.admin_url + "/admin/v1/orgs", json={"id": org}, headers=bearer(OPS_TOKEN)
    ) as resp:
        assert resp.status == 201, await resp.text()
    entries = (await _audit(http, proxy, head))["entries"]
    mine = [e for e in entries if org in json.dumps(e["after"]) or org in e["target"]]
    assert mine and all(e["config_version"] == new for e in mine), entries


async def _audit_status(http: aiohttp.ClientSession, proxy: ReloadableProxy, token: str) -> int:
    async with http.get(
        proxy.serve.admin_url + "/admin/v1/audit", params={"limit": "1"}, headers=bearer(token)
    ) as resp:
        await resp.read()
        return resp.status


async def test_admin_tokens_added_and_removed_by_reload_take_effect_at_once(
    proxy: ReloadableProxy, http: aiohttp.ClientSession
) -> None:
    assert await _audit_status(http, proxy, OPS_TOKEN) == 200
    assert await _audit_status(http, proxy, ADDED_TOKEN) == 401
    doc = copy.deepcopy(proxy.doc)
    doc["admin"]["tokens"] = [
        token_entry("new", ADDED_TOKEN, ["operator"]),
        token_entry("dashboards", VIEWER_TOKEN, ["viewer"]),
    ]
    rewrite_unseen(proxy.path, render(doc), proxy.worker_pids())
    status, answer = await admin_reload(http, proxy, OPS_TOKEN)
    assert (status, answer["result"]) == (200, "ok"), answer
    assert await _audit_status(http, proxy, OPS_TOKEN) == 401
    assert await _audit_status(http, proxy, ADDED_TOKEN) == 200
    status, answer = await admin_reload(http, proxy, OPS_TOKEN)
    assert status == 401, answer
    status, answer = await admin_reload(http, proxy, ADDED_TOKEN)
    assert (status, answer["result"]) == (200, "unchanged"), answer


# ---------------------------------------------------------------------------- connections


@contextlib.asynccontextmanager
async def counted_session() -> AsyncIterator[tuple[aiohttp.ClientSession, list[int]]]:
    """A session on one keep-alive connection at most, counting the connections it opened."""
    opened: list[int] = []

    async def on_create(*_: Any) -> None:
        opened.append(1)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_create)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(
        connector=connector,
        trace_configs=[trace],
        timeout=aiohttp.ClientTimeout(total=30),
    ) as session:
        yield session, opened


async def test_keep_alive_connection_and_stream_in_flight_survive_the_reload(
    proxy: ReloadableProxy, tenants: Tenants, http: aiohttp.ClientSession
) -> None:
    async with counted_session() as (conn, opened):
        answer = await request(
            conn, proxy.serve.data_url, CHATGPT_PATH, key=tenants.chat.key, model=MODEL
        )
        assert_error(answer, "product_unavailable")
        headers = {
            "Authorization": f"Bearer {tenants.api.key}",
            "x-mock-chunks": "6",
            "x-mock-chunk-delay-ms": "100",
        }
        async with conn.post(
            proxy.serve.data_url + "/v1/chat/completions",
            json=chat_body(MODEL, stream=True),
            headers=headers,
        ) as stream:
            assert stream.status == 200
            first = await stream.content.readline()
            assert first.startswith(b"data: "), first
            text = rewrite_unseen(proxy.path, render(flipped(proxy.doc)), proxy.worker_pids())
            status, reloaded = await admin_reload(http, proxy)
            assert (status, reloaded["version"]) == (200, version_of(text)), reloaded
            rest = await stream.read()
        assert rest.rstrip().endswith(b"data: [DONE]"), rest[-200:]
        answer = await request(
            conn, proxy.serve.data_url, CHATGPT_PATH, key=tenants.chat.key, model=MODEL
        )
        assert_allowed(answer)
        assert_allowed(
            await request(conn, proxy.serve.data_url, key=tenants.plain.key, model=MODEL)
        )
        assert len(opened) == 1


# ---------------------------------------------------------------------------- under load


@dataclass
class Tally:
    good: int = 0
    bad: int = 0
    first_bad: str = ""

    def record(self, ok: bool, what: str) -> None:
        if ok:
            self.good += 1
        else:
            self.bad += 1
            self.first_bad = self.first_bad or what


def _is_expected(answer: Answer, expected: str, stream: bool) -> bool:
    if expected != "ok":
        if answer.status != 404 or not answer.headers.get("x-request-id"):
            return False
        return bool(answer.json()["error"]["code"] == expected)
    if answer.status != 200:
        return False
    if stream:
        return answer.body.rstrip().endswith(b"data: [DONE]") and b'"content"' in answer.body
    return bool(answer.json()["choices"][0]["message"]["content"])


async def _client(
    url: str, tenant: Tenant, expected: str, stream: bool, done: asyncio.Event, tally: Tally
) -> None:
    headers = {"x-mock-chunks": "4", "x-mock-chunk-delay-ms": "15"} if stream else {}
    body = chat_body(MODEL, stream=True) if stream else chat_body(MODEL)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        while not done.is_set():
            try:
                answer = await request(
                    session, url, key=tenant.key, json_body=body, headers=headers
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                tally.record(False, repr(exc))
                continue
            tally.record(
                _is_expected(answer, expected, stream), f"{answer.status} {answer.body[:300]!r}"
            )


async def test_no_request_fails_while_the_config_is_reloaded_100_times(
    proxy: ReloadableProxy, tenants: Tenants, http: aiohttp.ClientSession
) -> None:
    # Two valid configs that both allow the traffic, differing in a rate limit and in an
    # unrelated program's phase; and an invalid one in between each.
    valid_a = copy.deepcopy(proxy.doc)
    valid_b = copy.deepcopy(proxy.doc)
    valid_b["rate_limits"]["default"]["requests_per_minute"] = 900_000
    valid_b["programs"]["gpt-5.5-alpha"]["phases"]["codex"] = "preview"
    texts = [render(valid_a), render(invalid(valid_a)), render(valid_b), render(invalid(valid_b))]
    ok_before = await reloads(http, proxy, "ok")
    errors_before = await reloads(http, proxy, "error")

    done = asyncio.Event()
    tally = Tally()
    url = proxy.serve.data_url
    clients = [
        _client(url, tenants.api, "ok", False, done, tally),
        _client(url, tenants.api, "ok", False, done, tally),
        _client(url, tenants.api, "ok", True, done, tally),
        _client(url, tenants.api, "ok", True, done, tally),
        _client(url, tenants.api, "ok", True, done, tally),
        _client(url, tenants.plain, "model_not_found", False, done, tally),
        _client(url, tenants.plain, "model_not_found", False, done, tally),
        _client(url, tenants.chat, "model_not_found", True, done, tally),
    ]
    tasks = [asyncio.create_task(c) for c in clients]
    active = proxy.version
    answers: list[tuple[int, str, str]] = []
    try:
        async with asyncio.timeout(ZERO_FAILURE_DEADLINE_S):
            for i in range(1, ZERO_FAILURE_RELOADS + 1):
                text = texts[i % len(texts)]
                write_by_rename(proxy.path, text)
                status, answer = await admin_reload(http, proxy)
                if i % 2 == 0:
                    active = version_of(text)
                answers.append((status, answer.get("version", ""), active))
                if i % 10 == 0:
                    await asyncio.sleep(0.05)  # let the watcher see some files first
    finally:
        done.set()
        await asyncio.gather(*tasks)

    wrong = [
        (i + 1, a) for i, a in enumerate(answers) if a[0] != (200 if i % 2 else 422) or a[1] != a[2]
    ]
    assert not wrong, wrong[:5]
    assert tally.bad == 0, (tally.bad, tally.good, tally.first_bad)
    assert tally.good >= 8 * 5, tally
    assert await readyz_version(http, proxy) == active
    assert await reloads(http, proxy, "error") >= errors_before + ZERO_FAILURE_RELOADS // 2
    assert await reloads(http, proxy, "ok") >= ok_before + ZERO_FAILURE_RELOADS // 2
