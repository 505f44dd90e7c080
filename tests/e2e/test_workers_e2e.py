"""``access-proxy serve --workers 2`` end to end (SPEC §2, §8, §9): both workers serve on the
shared ports, ``/metrics`` on either merges both, a phase flip by the file, by ``SIGHUP`` to the
supervisor and by the admin call reaches every worker before the next request, and ``SIGTERM`` to
the supervisor drains a stream in flight and exits 0 with no worker left behind.

Which worker answered is read from the workers' own Prometheus multiprocess files (one per
process id), so nothing is added to the product for the tests.
"""

from __future__ import annotations

import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from tests.conftest import wait_until
from tests.e2e.conftest import (
    PREVIEW,
    Seeder,
    Stack,
    assert_allowed,
    assert_error,
    chat_body,
    metric_samples,
    request,
)
from tests.e2e.test_reload_e2e import (
    CHATGPT_PATH,
    MODEL,
    RELOAD_DEADLINE_S,
    ReloadableProxy,
    Tenants,
    admin_reload,
    flipped,
    launch,
    listens_on,
    render,
    rewrite_unseen,
    seed_tenants,
    version_of,
    write_in_place,
)

WORKERS = 2
# Fresh connections are spread over the workers by a hash of the client's port; with this many
# the chance that one worker gets none is below 1e-11.
FRESH_CONNECTIONS = 40

Counts = dict[tuple[str, str, str], float]


@pytest.fixture
def workers(stack: Stack, tmp_path: Path) -> Iterator[ReloadableProxy]:
    started = launch(stack, tmp_path / "workers", workers=WORKERS)
    pids = started.worker_pids()
    try:
        yield started
    finally:
        if started.serve.proc.poll() is None:
            code = started.serve.stop()
            assert code == 0, f"the supervisor exited with {code}:\n{started.serve.log()}"
        assert not [p for p in pids if Path(f"/proc/{p}").exists()], "a worker was left behind"


@pytest.fixture
async def tenants(seed: Seeder) -> Tenants:
    return await seed_tenants(seed)


def worker_samples(proxy: ReloadableProxy, pid: int, scratch: Path) -> list[Any]:
    """The samples of one worker alone, read from its multiprocess files."""
    scratch.mkdir(parents=True, exist_ok=True)
    for old in scratch.glob("*.db"):
        old.unlink()
    for db in proxy.metrics_dir().glob(f"*_{pid}.db"):
        shutil.copy(db, scratch / db.name)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(scratch))  # type: ignore[no-untyped-call]
    return [s for family in registry.collect() for s in family.samples]


def requests_by_worker(proxy: ReloadableProxy, pid: int, scratch: Path) -> Counts:
    """``access_proxy_requests_total`` of one worker, read from its multiprocess files."""
    return {
        (s.labels["product"], s.labels["program"], s.labels["code"]): s.value
        for s in worker_samples(proxy, pid, scratch)
        if s.name == "access_proxy_requests_total"
    }


async def merged_requests(http: aiohttp.ClientSession, proxy: ReloadableProxy) -> Counts:
    samples = await metric_samples(http, proxy.serve.admin_url)
    return {
        (labels["product"], labels["program"], labels["code"]): value
        for name, labels, value in samples
        if name == "access_proxy_requests_total"
    }


def fresh_connections() -> aiohttp.ClientSession:
    """A session that opens a new connection for every request."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        timeout=aiohttp.ClientTimeout(total=30),
    )


def workers_at_version(proxy: ReloadableProxy, version: str, scratch: Path) -> bool:
    """Whether every worker shows ``version`` as its active config (in its own files: the merged
    ``/metrics`` shows one ``config_info`` series per active version, whoever runs it)."""
    return all(
        any(
            s.name == "access_proxy_config_info" and s.labels["version"] == version and s.value == 1
            for s in worker_samples(proxy, pid, scratch / f"v{pid}")
        )
        for pid in proxy.worker_pids()
    )


async def test_both_workers_serve_and_metrics_merge(
    workers: ReloadableProxy, tenants: Tenants, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    pids = workers.worker_pids()
    assert len(pids) == WORKERS and workers.serve.proc.pid not in pids
    for pid in pids:
        assert listens_on(pid, workers.serve.data_port) and listens_on(
            pid, workers.serve.admin_port
        )
    async with fresh_connections() as fresh:
        for _ in range(FRESH_CONNECTIONS):
            assert_allowed(
                await request(fresh, workers.serve.data_url, key=tenants.api.key, model=MODEL)
            )
    key = ("api", PREVIEW, "ok")
    per_worker = [requests_by_worker(workers, pid, tmp_path / str(pid)).get(key, 0) for pid in pids]
    assert all(n > 0 for n in per_worker), per_worker
    assert sum(per_worker) == FRESH_CONNECTIONS, per_worker
    # Asked on fresh connections, so the merged view comes from whichever worker answers.
    for _ in range(4):
        assert (await merged_requests(http, workers)).get(key) == FRESH_CONNECTIONS


async def _flip(trigger: str, proxy: ReloadableProxy, http: aiohttp.ClientSession) -> str:
    """Flip the phases through ``trigger``; the new version."""
    text = render(flipped(proxy.doc))
    if trigger == "file":
        write_in_place(proxy.path, text)
        return version_of(text)
    # The watchers cannot see this rewrite: only the trigger itself can reach every worker.
    text = rewrite_unseen(proxy.path, text, proxy.worker_pids())
    if trigger == "sighup":
        proxy.serve.proc.send_signal(signal.SIGHUP)
    else:
        status, answer = await admin_reload(http, proxy)
        assert (status, answer["result"]) == (200, "ok"), answer
        assert answer["version"] == version_of(text)
        # The other worker confirmed before the answer (other replicas on this test Redis, with
        # other files, are asked too and answer with their own versions).
        assert answer["peers"]["confirmed"] >= 1, answer
    return version_of(text)


@pytest.mark.parametrize("trigger", ["file", "sighup", "admin"])
async def test_phase_flip_reaches_every_worker(
    trigger: str,
    workers: ReloadableProxy,
    tenants: Tenants,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    url = workers.serve.data_url
    async with fresh_connections() as fresh:
        for _ in range(FRESH_CONNECTIONS // 4):
            answer = await request(fresh, url, CHATGPT_PATH, key=tenants.chat.key, model=MODEL)
            assert_error(answer, "product_unavailable")
        version = await _flip(trigger, workers, http)

        def everywhere() -> bool:
            return workers_at_version(workers, version, tmp_path)

        if trigger != "admin":  # the admin answer comes after every worker confirmed
            await wait_until(everywhere, RELOAD_DEADLINE_S, 0.02, f"every worker at {version}")
        # The merged view names the one active version, with no pid and no retired version.
        samples = await metric_samples(http, workers.serve.admin_url)
        info = [labels for name, labels, _ in samples if name == "access_proxy_config_info"]
        assert info == [{"version": version}], info
        for _ in range(FRESH_CONNECTIONS):
            answer = await request(fresh, url, CHATGPT_PATH, key=tenants.chat.key, model=MODEL)
            assert_allowed(answer)
            assert_allowed(await request(fresh, url, key=tenants.plain.key, model=MODEL))
    # Each worker decided some of those under the new phases.
    for pid in workers.worker_pids():
        counts = requests_by_worker(workers, pid, tmp_path / str(pid))
        assert counts.get(("chatgpt", PREVIEW, "ok"), 0) > 0, (pid, counts)
        assert counts.get(("api", PREVIEW, "ok"), 0) > 0, (pid, counts)


async def test_sigterm_drains_a_stream_and_leaves_no_worker(
    workers: ReloadableProxy, tenants: Tenants
) -> None:
    pids = workers.worker_pids()
    metrics_dir = workers.metrics_dir()
    headers = {
        "Authorization": f"Bearer {tenants.api.key}",
        "x-mock-chunks": "8",
        "x-mock-chunk-delay-ms": "100",
    }
    async with (
        fresh_connections() as fresh,
        fresh.post(
            workers.serve.data_url + "/v1/chat/completions",
            json=chat_body(MODEL, stream=True),
            headers=headers,
        ) as stream,
    ):
        assert stream.status == 200
        first = await stream.content.readline()
        assert first.startswith(b"data: "), first
        workers.serve.terminate()
        rest = await stream.read()
    assert rest.rstrip().endswith(b"data: [DONE]"), rest[-200:]
    assert workers.serve.wait_exit() == 0, workers.serve.log()
    left = [p for p in pids if Path(f"/proc/{p}").exists()]
    assert not left, left
    assert not metrics_dir.exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", workers.serve.data_port), timeout=5).close()
