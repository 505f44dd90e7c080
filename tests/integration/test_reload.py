"""Hot reload: every trigger (file change in three shapes, SIGHUP, a peer on Redis) runs the same
validate-then-swap path; an invalid file changes nothing; restart-only settings stay; requests in
flight keep their snapshot."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from redis.asyncio.client import PubSub

from proxy import config
from proxy.reload import RELOAD_CHANNEL, Reloader
from proxy.snapshot import Holder, Snapshot
from tests.conftest import wait_until

BASE = """\
listen: {{host: 127.0.0.1, port: 8080}}
admin:
  listen: {{host: 127.0.0.1, port: 8081}}
redis: {{url: embedded}}
state_dir: .state
upstreams:
  models:
    url: http://127.0.0.1:8089
routes:
  - {{path_prefix: /v1/, product: api, upstream: models}}
programs:
  gpt-5.6-preview:
    models: [gpt-5.6-sol, gpt-5.6-terra]
    phases: {{api: {phase}}}
shutdown_grace_s: {grace}
"""

INVALID = """\
upstreams:
  models:
    url: ftp://nowhere
routes:
  - {path_prefix: /v1/, product: api, upstream: missing}
programs:
  gpt-5.6-preview:
    models: [gpt-5.6-sol]
    phases: {api: beta}
"""


def valid(grace: int = 30, phase: str = "preview") -> str:
    return BASE.format(grace=grace, phase=phase)


def version_of(text: str) -> str:
    return config.parse(text).version


def reloads(result: str) -> float:
    value = REGISTRY.get_sample_value("access_proxy_config_reloads_total", {"result": result})
    return value or 0.0


def config_info(version: str) -> float | None:
    return REGISTRY.get_sample_value("access_proxy_config_info", {"version": version})


def write_in_place(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def write_and_rename(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.swp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ConfigMap:
    """The layout Kubernetes mounts: the file is a symlink through ``..data`` to a timestamped
    directory, and an update swaps ``..data`` atomically."""

    def __init__(self, root: Path, text: str) -> None:
        self.root = root
        self.generation = 0
        self._publish(text)
        (root / "proxy.yaml").symlink_to("..data/proxy.yaml")

    @property
    def path(self) -> Path:
        return self.root / "proxy.yaml"

    def _publish(self, text: str) -> None:
        self.generation += 1
        name = f"..2024_01_01_00_00_{self.generation:02d}.000000000"
        (self.root / name).mkdir()
        (self.root / name / "proxy.yaml").write_text(text)
        # Every generation gets the same old mtime, so only the inode and the realpath differ.
        os.utime(self.root / name / "proxy.yaml", ns=(10**18, 10**18))
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(name)
        os.replace(tmp, self.root / "..data")

    def update(self, text: str) -> None:
        self._publish(text)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "proxy.yaml"
    path.write_text(valid())
    return path


@pytest.fixture
async def started() -> AsyncIterator[Callable[[Reloader], Reloader]]:
    running: list[Reloader] = []

    def track(reloader: Reloader) -> Reloader:
        running.append(reloader)
        return reloader

    yield track
    for reloader in running:
        await reloader.stop()


async def watching(path: Path, track: Callable[[Reloader], Reloader]) -> Reloader:
    reloader = track(Reloader(Holder(config.load(path)), str(path), poll_interval=0.02))
    await reloader.start()
    return reloader


def active(reloader: Reloader) -> str:
    return reloader.holder.current.config.version


def at_version(reloader: Reloader, text: str) -> Callable[[], bool]:
    expected = version_of(text)
    return lambda: active(reloader) == expected


# --------------------------------------------------------------------------- file changes


async def test_in_place_write_reloads(
    config_file: Path, started: Callable[[Reloader], Reloader]
) -> None:
    reloader = await watching(config_file, started)
    old = active(reloader)
    text = valid(grace=31, phase="ga")
    write_in_place(config_file, text)
    await wait_until(lambda: active(reloader) == version_of(text), message="in-place write")
    cfg = reloader.holder.current.config
    assert cfg.programs["gpt-5.6-preview"].phases["api"] == "ga"
    assert cfg.shutdown_grace_s == 31
    assert reloader.last_result is not None
    assert reloader.last_result.result == "ok"
    assert "~ programs.gpt-5.6-preview.phases.api: preview -> ga" in reloader.last_result.changes
    assert config_info(version_of(text)) == 1
    assert config_info(old) is None


async def test_write_to_temp_and_rename_reloads(
    config_file: Path, started: Callable[[Reloader], Reloader]
) -> None:
    reloader = await watching(config_file, started)
    text = valid(grace=32)
    write_and_rename(config_file, text)
    await wait_until(lambda: active(reloader) == version_of(text), message="rename over")


async def test_configmap_symlink_swap_reloads(
    tmp_path: Path, started: Callable[[Reloader], Reloader]
) -> None:
    mount = ConfigMap(tmp_path, valid())
    reloader = await watching(mount.path, started)
    for grace in (33, 34):  # the same size each time
        mount.update(valid(grace=grace))
        await wait_until(at_version(reloader, valid(grace=grace)), message="..data swap")
    assert reloader.holder.current.config.shutdown_grace_s == 34


async def test_half_written_file_is_an_error_then_the_finished_write_reloads(
    config_file: Path, started: Callable[[Reloader], Reloader]
) -> None:
    reloader = await watching(config_file, started)
    before = reloader.holder.current
    errors = reloads("error")
    text = valid(grace=35)
    write_in_place(config_file, text[: text.index("routes:")])
    await wait_until(lambda: reloads("error") == errors + 1, message="half-written file rejected")
    assert reloader.holder.current is before
    # The same half-written content seen again is not tried again.
    os.utime(config_file)
    assert reloader.check_file() is None
    assert reloads("error") == errors + 1

    write_in_place(config_file, text)
    await wait_until(lambda: active(reloader) == version_of(text), message="finished write")
    assert reloads("error") == errors + 1


async def test_touch_without_content_change_does_not_reload(config_file: Path) -> None:
    reloader = Reloader(Holder(config.load(config_file)), str(config_file))
    assert reloader.check_file() is not None  # first look: the file's content is new to it
    before = reloader.holder.current
    oks = reloads("ok")
    os.utime(config_file, ns=(1, 1))
    assert reloader.check_file() is None
    assert reloader.holder.current is before
    assert reloads("ok") == oks


async def test_missing_file_keeps_serving_and_reappearing_file_reloads(config_file: Path) -> None:
    reloader = Reloader(Holder(config.load(config_file)), str(config_file))
    before = reloader.holder.current
    config_file.unlink()
    errors = reloads("error")
    assert reloader.check_file() is None
    assert reloader.holder.current is before
    assert reloads("error") == errors
    text = valid(grace=36)
    config_file.write_text(text)
    result = reloader.check_file()
    assert result is not None and result.result == "ok"
    assert active(reloader) == version_of(text)


# --------------------------------------------------------------------------- SIGHUP


async def test_sighup_reloads(config_file: Path) -> None:
    reloader = Reloader(Holder(config.load(config_file)), str(config_file))
    reloader.install_sighup(asyncio.get_running_loop())
    try:
        text = valid(grace=37)
        write_in_place(config_file, text)  # no watcher: only the signal can reload
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_until(lambda: active(reloader) == version_of(text), message="SIGHUP reload")
    finally:
        await reloader.stop()


# --------------------------------------------------------------------------- invalid config


async def test_invalid_file_changes_nothing_and_every_error_is_located(
    config_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reloader = Reloader(Holder(config.load(config_file)), str(config_file))
    before = reloader.holder.current
    errors = reloads("error")
    config_file.write_text(INVALID)
    with caplog.at_level(logging.ERROR, logger="proxy.reload"):
        result = reloader.reload("admin")
    assert result.result == "error"
    assert result.status == 422
    assert result.version == before.config.version
    assert reloader.holder.current is before
    assert reloads("error") == errors + 1
    paths = {e["path"] for e in result.errors}
    assert paths == {
        "upstreams.models.url",
        "routes[0].upstream",
        "programs.gpt-5.6-preview.phases.api",
    }
    assert all(isinstance(e["line"], int) for e in result.errors)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for e in result.errors:
        assert f"{config_file}:{e['line']}: {e['path']}: {e['message']}" in logged
    body = result.as_json()
    assert body["result"] == "error" and body["version"] == before.config.version
    assert body["errors"] == result.errors


async def test_unreadable_file_is_an_error(config_file: Path) -> None:
    reloader = Reloader(Holder(config.load(config_file)), str(config_file))
    before = reloader.holder.current
    config_file.unlink()
    result = reloader.reload("sighup")
    assert result.result == "error"
    assert result.errors[0]["message"].startswith("cannot read file")
    assert reloader.holder.current is before


async def test_alternating_valid_and_invalid_reloads_leave_the_right_snapshot(
    config_file: Path,
) -> None:
    reloader = Reloader(Holder(config.load(config_file)), str(config_file))
    oks, errors = reloads("ok"), reloads("error")
    for i in range(100):
        phase = ("preview", "ga")[i % 2]
        text = valid(grace=100 + i, phase=phase)
        expected = version_of(text)
        config_file.write_text(text)
        result = reloader.reload("admin")
        assert (result.result, result.version) == ("ok", expected)
        good = reloader.holder.current
        assert good.config.version == expected
        assert good.config.shutdown_grace_s == 100 + i
        assert good.config.programs["gpt-5.6-preview"].phases["api"] == phase

        config_file.write_text(INVALID if i % 3 else text[: len(text) // 2])
        result = reloader.reload("admin")
        assert (result.result, result.version) == ("error", expected)
        assert result.errors
        assert reloader.holder.current is good
        assert config_info(expected) == 1
    assert reloads("ok") == oks + 100
    assert reloads("error") == errors + 100


# --------------------------------------------------------------------------- restart-only


async def test_restart_only_settings_are_reported_and_not_applied(config_file: Path) -> None:
    swaps: list[tuple[config.Config, config.Config]] = []
    running = config.load(config_file)
    reloader = Reloader(
        Holder(running), str(config_file), on_swap=lambda a, b: swaps.append((a, b))
    )
    text = (
        valid(phase="ga")
        .replace("port: 8080", "port: 9090")
        .replace("port: 8081", "port: 9091")
        .replace("url: embedded", "url: redis://127.0.0.1:7000/0")
        .replace("state_dir: .state", "state_dir: /var/lib/elsewhere")
    )
    config_file.write_text(text)
    result = reloader.reload("admin")
    assert result.result == "ok"
    assert result.version == version_of(text)
    cfg = reloader.holder.current.config
    assert cfg.version == version_of(text)
    assert cfg.listen == running.listen
    assert cfg.admin.listen == running.admin.listen
    assert cfg.redis.url == running.redis.url
    assert cfg.state_dir == running.state_dir
    assert cfg.programs["gpt-5.6-preview"].phases["api"] == "ga"
    assert sorted(line.split(":")[0] for line in result.restart_required) == [
        "! admin.listen",
        "! listen",
        "! redis.url",
        "! state_dir",
    ]
    assert "! listen: 127.0.0.1:8080 -> 127.0.0.1:9090 (needs a restart)" in (
        result.restart_required
    )
    assert result.changes == ["~ programs.gpt-5.6-preview.phases.api: preview -> ga"]
    assert swaps == [(running, cfg)]

    # Reloading the same file again: nothing new, the held settings are still reported.
    again = reloader.reload("sighup")
    assert again.result == "unchanged"
    assert again.changes == []
    assert again.restart_required == result.restart_required
    assert reloader.holder.current.config is cfg


# --------------------------------------------------------------------------- in flight


async def test_request_in_flight_keeps_its_snapshot(config_file: Path) -> None:
    reloader = Reloader(Holder(config.load(config_file)), str(config_file))
    taken = asyncio.Event()
    finish = asyncio.Event()

    async def request() -> tuple[Snapshot, str, str]:
        snap = reloader.holder.current  # once, at the start
        started_phase = snap.config.programs["gpt-5.6-preview"].phases["api"]
        taken.set()
        await finish.wait()
        return snap, started_phase, snap.config.programs["gpt-5.6-preview"].phases["api"]

    task = asyncio.create_task(request())
    await taken.wait()
    before = reloader.holder.current
    config_file.write_text(valid(phase="ga"))
    assert reloader.reload("admin").result == "ok"
    finish.set()
    snap, at_start, at_end = await task
    assert snap is before
    assert (at_start, at_end) == ("preview", "preview")
    assert reloader.holder.current is not before
    assert reloader.holder.current.config.programs["gpt-5.6-preview"].phases["api"] == "ga"


# --------------------------------------------------------------------------- every worker


async def announced_versions(pubsub: PubSub, until: str) -> list[str]:
    """The versions announced on the reload channel, in order, up to and including ``until``."""
    versions: list[str] = []
    deadline = time.monotonic() + 5.0
    while until not in versions:
        assert time.monotonic() < deadline, f"no announcement of {until}; saw {versions}"
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if msg is not None:
            message = json.loads(msg["data"])
            if message.get("kind", "reload") == "reload":  # not the peers' acknowledgements
                versions.append(message["version"])
    return versions


async def test_reload_everywhere_makes_another_worker_reload(
    config_file: Path, redis_url: str
) -> None:
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(3)]
    listener = clients[2].pubsub()
    await listener.subscribe(RELOAD_CHANNEL)
    # A poll interval of an hour: after start, only the Redis announcement can reload.
    first, second = (
        Reloader(Holder(config.load(config_file)), str(config_file), redis=c, poll_interval=3600)
        for c in clients[:2]
    )
    try:
        for reloader in (first, second):
            await reloader.start()
        await wait_until(lambda: first.subscribed.is_set() and second.subscribed.is_set())

        text = valid(grace=38, phase="ga")
        config_file.write_text(text)
        result = await first.reload_everywhere("admin")
        assert (result.result, result.version) == ("ok", version_of(text))
        assert active(first) == version_of(text)
        # The answer waited for the peer: it runs the new version already.
        assert result.peers_confirmed >= 1 and active(second) == version_of(text)
        assert second.last_result is not None and second.last_result.result == "ok"

        # A rejected file is not announced: between the two good announcements there is none.
        config_file.write_text(INVALID)
        body = await first.admin_reload()
        assert body["result"] == "error" and body["version"] == version_of(text)
        last = valid(grace=39)
        config_file.write_text(last)
        assert (await first.reload_everywhere("admin")).result == "ok"
        await wait_until(lambda: active(second) == version_of(last), message="next announcement")
        assert await announced_versions(listener, version_of(last)) == [
            version_of(text),
            version_of(last),
        ]
    finally:
        for reloader in (first, second):
            await reloader.stop()
        await listener.aclose()  # type: ignore[no-untyped-call]
        for client in clients:
            await client.aclose()
