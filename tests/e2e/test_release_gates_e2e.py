"""Release gates through every reload trigger of a real ``serve`` (SPEC §4, §8): a file that
puts the gated program in ``ga`` before its gate opens is refused by the watcher, by SIGHUP and
by the admin call (422 naming the location and the time it opens), and nothing changes; the same
flip with a gate already open is taken at once."""

from __future__ import annotations

import copy
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import wait_until
from tests.e2e.conftest import (
    NOT_FOUND_MESSAGE,
    PREVIEW,
    Seeder,
    Stack,
    Tenant,
    assert_allowed,
    assert_error,
    request,
)
from tests.e2e.test_reload_e2e import (
    RELOAD_DEADLINE_S,
    ReloadableProxy,
    admin_reload,
    launch,
    readyz_version,
    reloads,
    render,
    rewrite_unseen,
    version_of,
    write_by_rename,
)

MODEL = "gpt-5.6-sol"
PHASE_PATH = f"programs.{PREVIEW}.phases.api"


def _at(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def gated_ga(doc: dict[str, Any], gate: float) -> dict[str, Any]:
    """``doc`` with the preview in ga on the api and its release gate at ``gate``."""
    out = copy.deepcopy(doc)
    program = out["programs"][PREVIEW]
    program["phases"]["api"] = "ga"
    program["release_gates"] = {"ga_not_before": _at(gate)}
    return out


@pytest.fixture
def proxy(stack: Stack, tmp_path: Path) -> Iterator[ReloadableProxy]:
    started = launch(stack, tmp_path / "proxy")
    try:
        yield started
    finally:
        code = started.serve.stop()
        assert code == 0, f"serve exited with {code}:\n{started.serve.log()}"


async def _still_preview(http: aiohttp.ClientSession, url: str, plain: Tenant) -> None:
    answer = await request(http, url, key=plain.key, model=MODEL)
    assert_error(answer, "model_not_found", NOT_FOUND_MESSAGE)


async def test_ga_before_the_gate_is_refused_by_every_trigger_then_taken_once_it_opens(
    proxy: ReloadableProxy, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    plain = await seed.tenant()  # no grant: only ga lets it through
    url = proxy.serve.data_url
    await _still_preview(http, url, plain)
    gate = time.time() + 86400

    # The watcher sees the file and refuses it.
    errors = await reloads(http, proxy, "error")
    early = render(gated_ga(proxy.doc, gate))
    write_by_rename(proxy.path, early)

    async def refused_once_more() -> bool:
        return await reloads(http, proxy, "error") > errors

    await wait_until(refused_once_more, RELOAD_DEADLINE_S, 0.02, "watcher refused the file")
    assert await readyz_version(http, proxy) == proxy.version
    await _still_preview(http, url, plain)

    # SIGHUP reads the same file and refuses it too.
    errors = await reloads(http, proxy, "error")
    proxy.serve.proc.send_signal(signal.SIGHUP)
    await wait_until(refused_once_more, RELOAD_DEADLINE_S, 0.02, "SIGHUP refused the file")
    await _still_preview(http, url, plain)

    # The admin call answers 422 with the location and the time the gate opens.
    status, answer = await admin_reload(http, proxy)
    assert status == 422, answer
    assert answer["error"]["code"] == "invalid_config", answer
    (error,) = [e for e in answer["errors"] if e["path"] == PHASE_PATH]
    assert _at(gate) in error["message"] and isinstance(error["line"], int), error
    assert answer["version"] == proxy.version
    await _still_preview(http, url, plain)

    # The same flip with the gate already open is taken at once.
    opened = rewrite_unseen(
        proxy.path, render(gated_ga(proxy.doc, time.time() - 60)), proxy.worker_pids()
    )
    status, answer = await admin_reload(http, proxy)
    assert status == 200 and answer["version"] == version_of(opened), answer
    assert any(PHASE_PATH in change for change in answer["changes"]), answer
    assert_allowed(await request(http, url, key=plain.key, model=MODEL))
