"""The access log against real ``serve`` processes (SPEC §11): one JSON line per request with
exactly the SPEC's fields; denials only by default, on stderr; never a key, a body or the upstream
credential; sampling of allowed requests only; reopened on SIGUSR1 for rotation (one process and
a supervisor with workers); a blocked sink drops and counts lines while requests go on."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import string
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import wait_until
from tests.e2e.conftest import (
    ALPHA,
    PREVIEW,
    UPSTREAM_SECRET,
    Answer,
    Seeder,
    Stack,
    Tenant,
    assert_allowed,
    assert_error,
    chat_body,
    metric_samples,
    request,
)
from tests.e2e.test_reload_e2e import ReloadableProxy, launch

FIELDS = {
    "ts",
    "request_id",
    "product",
    "program",
    "model",
    "org",
    "workspace",
    "key_id",
    "code",
    "status",
    "duration_ms",
    "ttfb_ms",
    "upstream_status",
    "tokens",
}
MODEL = "gpt-5.6-sol"
LOG_DEADLINE_S = 30.0


def log_lines(text: str) -> list[dict[str, Any]]:
    """The access log's lines among whatever else the stream holds (warnings on stderr)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith('{"ts":')]


def read_lines(path: Path) -> list[dict[str, Any]]:
    return log_lines(path.read_text()) if path.exists() else []


async def logged(
    source: Any, rids: set[str], deadline: float = LOG_DEADLINE_S
) -> dict[str, dict[str, Any]]:
    """The lines of ``rids`` once all are written (``source()`` reads every line so far)."""
    found: dict[str, dict[str, Any]] = {}

    def complete() -> bool:
        found.clear()
        found.update({line["request_id"]: line for line in source() if line["request_id"] in rids})
        return set(found) == rids

    await wait_until(complete, deadline, 0.05, f"access log lines for {sorted(rids)}")
    return found


def rid(answer: Answer) -> str:
    return answer.headers["x-request-id"]


async def dropped(http: aiohttp.ClientSession, proxy: ReloadableProxy) -> float:
    samples = await metric_samples(http, proxy.serve.admin_url)
    return sum(v for n, _, v in samples if n == "access_proxy_access_log_dropped_total")


def started(stack: Stack, where: Path, workers: int = 1, **log: Any) -> ReloadableProxy:
    return launch(stack, where, workers=workers, overrides={"access_log": log} if log else None)


@pytest.fixture
def all_to_file(stack: Stack, tmp_path: Path) -> Iterator[tuple[ReloadableProxy, Path]]:
    path = tmp_path / "access.log"
    proxy = started(stack, tmp_path / "all", mode="all", path=str(path))
    try:
        yield proxy, path
    finally:
        assert proxy.serve.stop() == 0, proxy.serve.log()


@pytest.fixture
async def granted(seed: Seeder) -> AsyncIterator[Tenant]:
    tenant = await seed.tenant()
    await seed.grant(f"org:{tenant.org}")
    yield tenant


async def test_each_line_has_exactly_the_spec_fields(
    all_to_file: tuple[ReloadableProxy, Path],
    granted: Tenant,
    seed: Seeder,
    http: aiohttp.ClientSession,
) -> None:
    proxy, path = all_to_file
    url = proxy.serve.data_url
    ok = await request(http, url, key=granted.key, model=MODEL)
    assert_allowed(ok)
    stream = await request(http, url, key=granted.key, json_body=chat_body(MODEL, stream=True))
    assert stream.status == 200
    alpha = await request(http, url, key=granted.key, model="gpt-5.5-alpha")
    assert_error(alpha, "model_not_found")
    bad_key = await request(http, url, key="sk-ap-0123456789ab-" + "x" * 43, model=MODEL)
    assert_error(bad_key, "invalid_api_key")
    nowhere = await request(http, url, "/nowhere", key=granted.key)
    assert_error(nowhere, "unknown_route")
    answers = [ok, stream, alpha, bad_key, nowhere]
    lines = await logged(lambda: read_lines(path), {rid(a) for a in answers})

    for line in lines.values():
        assert set(line) == FIELDS, line
        assert line["ts"].endswith("Z") and line["duration_ms"] > 0, line
    who = {"org": granted.org, "workspace": granted.workspace, "key_id": granted.key_id}
    for answer in (ok, stream):
        line = lines[rid(answer)]
        assert (
            line.items()
            >= {
                "product": "api",
                "program": PREVIEW,
                "model": MODEL,
                "code": "ok",
                "status": 200,
                "upstream_status": 200,
                **who,
            }.items()
        ), line
        assert line["ttfb_ms"] > 0 and line["ttfb_ms"] <= line["duration_ms"], line
    tokens = lines[rid(ok)]["tokens"]
    assert set(tokens) == {"input", "cached_input", "cache_write", "output"}, tokens
    assert tokens["output"] > 0, tokens
    line = lines[rid(alpha)]
    assert line.items() >= {"code": "model_not_found", "status": 404, "program": ALPHA}.items()
    assert line.items() >= {"model": "gpt-5.5-alpha", "upstream_status": None, **who}.items()
    assert line["tokens"] is None and line["ttfb_ms"] is None, line
    line = lines[rid(bad_key)]
    assert line.items() >= {"code": "invalid_api_key", "status": 401, "org": None}.items()
    assert line["key_id"] == "0123456789ab", line  # the presented key's public id, never the key
    line = lines[rid(nowhere)]
    assert line.items() >= {"code": "unknown_route", "status": 404, "product": "none"}.items()


async def test_denials_by_default_on_stderr(
    stack: Stack, granted: Tenant, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = started(stack, tmp_path / "default")
    try:
        url = proxy.serve.data_url
        ok = await request(http, url, key=granted.key, model=MODEL)
        assert_allowed(ok)
        refused = await request(http, url, key=granted.key, model="gpt-5.5-alpha")
        assert_error(refused, "model_not_found")
        # Lines go out in order: once the later denial is there, the allowed one would be too.
        lines = await logged(lambda: log_lines(proxy.serve.log()), {rid(refused)})
        assert lines[rid(refused)]["code"] == "model_not_found"
        assert rid(ok) not in {line["request_id"] for line in log_lines(proxy.serve.log())}
    finally:
        assert proxy.serve.stop() == 0, proxy.serve.log()


_SECRET = st.text(string.ascii_letters + string.digits + "-_", min_size=24, max_size=48)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(secret=_SECRET, model=st.sampled_from([MODEL, "gpt-5.5-alpha", "gpt-4o-mini"]))
async def test_never_a_key_a_body_or_the_upstream_credential(
    all_to_file: tuple[ReloadableProxy, Path],
    granted: Tenant,
    http: aiohttp.ClientSession,
    secret: str,
    model: str,
) -> None:
    proxy, path = all_to_file
    url = proxy.serve.data_url
    body = chat_body(model, user=secret)
    body["messages"] = [{"role": "user", "content": f"my password is {secret}"}]
    headers = {"x-api-secret": secret, "cookie": f"session={secret}"}
    answers = [
        await request(http, url, key=granted.key, json_body=body, headers=headers),
        # A key with the secret inside, well-formed (unknown) and malformed.
        await request(http, url, key=f"sk-ap-{granted.key_id}-{secret}", json_body=body),
        await request(http, url, key=secret, json_body=body),
        await request(http, url, key=granted.key, data=f"{{{secret}".encode()),
    ]
    assert answers[0].status in (200, 404), answers[0]
    await logged(lambda: read_lines(path), {rid(a) for a in answers})
    text = path.read_text()
    for never in (secret, granted.key, granted.key.rsplit("-", 1)[1], UPSTREAM_SECRET):
        assert never not in text


async def test_sampling_applies_to_allowed_requests_only(
    stack: Stack, granted: Tenant, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    n = 200
    for sample, low, high in ((0.0, 0, 0), (0.5, 40, 160)):
        path = tmp_path / f"sample-{sample}.log"
        proxy = started(stack, tmp_path / f"s{sample}", mode="all", path=str(path), sample=sample)
        try:
            url = proxy.serve.data_url
            allowed = [await request(http, url, key=granted.key, model=MODEL) for _ in range(n)]
            assert all(a.status == 200 for a in allowed)
            denied = [
                await request(http, url, key=granted.key, model="gpt-5.5-alpha") for _ in range(20)
            ]
            # Every denial is logged, whatever the sample; lines are written in order.
            await logged(lambda p=path: read_lines(p), {rid(a) for a in denied})
            kept = {line["request_id"] for line in read_lines(path)} & {rid(a) for a in allowed}
            # Binomial(200, 0.5) lies in [40, 160] but with probability below 1e-17.
            assert low <= len(kept) <= high, (sample, len(kept))
        finally:
            assert proxy.serve.stop() == 0, proxy.serve.log()


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigusr1_reopens_the_file_after_rotation(
    stack: Stack, granted: Tenant, http: aiohttp.ClientSession, tmp_path: Path, workers: int
) -> None:
    path = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    proxy = started(stack, tmp_path / "rot", workers, mode="all", path=str(path))
    try:
        url = proxy.serve.data_url

        async def send() -> str:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                answer = await request(s, url, key=granted.key, model=MODEL)
            assert_allowed(answer)
            return rid(answer)

        before = {await send() for _ in range(6)}
        await logged(lambda: read_lines(path), before)
        path.rename(rotated)
        between = {await send() for _ in range(3)}  # still written to the moved file
        proxy.serve.proc.send_signal(signal.SIGUSR1)
        after: set[str] = set()

        async def reopened() -> bool:
            # Fresh connections reach every worker; each must have reopened by its next line.
            after.update([await send() for _ in range(4)])
            new = {line["request_id"] for line in read_lines(path)}
            # Lines sent before the signal may still be queued when the writer reopens.
            return len(new & after) >= 8 and new <= between | after

        await wait_until(reopened, LOG_DEADLINE_S, 0.05, "lines in the reopened file")
        sent = before | between | after
        everything = await logged(lambda: read_lines(path) + read_lines(rotated), sent)
        assert set(everything) == sent
        old = [line["request_id"] for line in read_lines(rotated)]
        new = [line["request_id"] for line in read_lines(path)]
        assert len(old) + len(new) == len(set(old) | set(new)), "a line was written twice"
        assert before <= set(old) and not before & set(new)
    finally:
        assert proxy.serve.stop() == 0, proxy.serve.log()


async def test_a_blocked_sink_drops_and_counts_lines_and_never_holds_requests(
    stack: Stack, granted: Tenant, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    # A reader that holds the pipe open and reads nothing, with the smallest pipe buffer.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        pipe_bytes = fcntl.fcntl(reader, fcntl.F_SETPIPE_SZ, 4096)
        queue = 10
        proxy = started(stack, tmp_path / "blocked", mode="all", path=str(fifo), queue_lines=queue)
        try:
            url = proxy.serve.data_url
            n = 200
            begun = time.monotonic()
            answers = await asyncio.gather(
                *(request(http, url, key=granted.key, model=MODEL) for _ in range(n))
            )
            assert all(a.status == 200 for a in answers), {a.status for a in answers}
            took = time.monotonic() - begun
            # Held by the log, these would wait for ever: the pipe is full and nobody reads it.
            count = await dropped(http, proxy)
            # At most the queue, one batch taken from it and the pipe's bytes were not dropped.
            assert count >= n - 2 * queue - pipe_bytes // 100, (count, took)

            # Reading the pipe lets the writer go on; every line is written or counted dropped.
            got = bytearray()

            async def accounted() -> bool:
                while True:
                    try:
                        chunk = os.read(reader, 65536)
                    except BlockingIOError:
                        break
                    if not chunk:
                        break
                    got.extend(chunk)
                written = len(log_lines(got.decode(errors="replace")))
                return written + await dropped(http, proxy) == n

            await wait_until(accounted, LOG_DEADLINE_S, 0.05, "every line written or dropped")
            later = await request(http, url, key=granted.key, model=MODEL)
            assert_allowed(later)

            async def written_later() -> bool:
                await accounted()
                return rid(later) in got.decode(errors="replace")

            await wait_until(written_later, LOG_DEADLINE_S, 0.05, "a line after the unblocking")
        finally:
            assert proxy.serve.stop() == 0, proxy.serve.log()
    finally:
        os.close(reader)
