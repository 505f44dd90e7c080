"""Token limits and usage per day across two real ``serve`` processes on one Redis (SPEC §6, §10):
together they admit at most the minute's token budget plus one answer per replica; refusals are
429 ``rate_limit_exceeded`` with ``retry-after`` and the token headers; a misuse tier scales the
budget; and the per-day usage in Redis adds up to exactly what the per-program metrics counted
over the same traffic, through the admin API and the CLI."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator

import aiohttp
import pytest

from proxy import config
from proxy.policy.standing import Flag
from proxy.store.writes import Actor
from tests.conftest import wait_until
from tests.e2e.conftest import (
    ALPHA,
    BASE_CONFIG,
    PREVIEW,
    REPO,
    Answer,
    Seeder,
    ServeProcess,
    Stack,
    assert_error,
    chat_body,
    metric_samples,
    request,
)

VIEW_TOKEN = "tokens-view-token-0123456789"
TPM = 600  # tokens a minute for the alpha program
PER_ANSWER = 100  # 60 prompt + 40 completion tokens
COST_KNOBS = {"x-mock-prompt-tokens": "60", "x-mock-completion-tokens": "40"}
CONFIG = {
    "admin": {
        "tokens": [
            {
                "name": "view",
                "sha256": hashlib.sha256(VIEW_TOKEN.encode()).hexdigest(),
                "roles": ["viewer"],
            }
        ]
    },
    "rate_limits": {
        "enabled": True,
        "default": {"requests_per_minute": 60000, "burst": 1000, "concurrent": 100},
        "programs": {ALPHA: {"tokens_per_minute": TPM}},
    },
    "usage": {"retention_days": 7},
}
TOKEN_HEADERS = (
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)


@pytest.fixture(scope="module")
def pair(stack: Stack) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    a = stack.start_serve("tokens-a", overrides=CONFIG)
    try:
        b = stack.start_serve("tokens-b", overrides=CONFIG)
        try:
            yield a, b
        finally:
            assert b.stop() == 0
    finally:
        assert a.stop() == 0


async def test_two_processes_admit_at_most_the_budget_plus_one_answer_each(
    pair: tuple[ServeProcess, ServeProcess], seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await seed.tenant()
    await seed.grant(f"workspace:{tenant.workspace}", ALPHA)
    admitted: list[Answer] = []
    refused: list[Answer] = []

    async def client_of(proxy: ServeProcess) -> None:
        refusals = 0
        while refusals < 3:  # one request at a time, as fast as answers come
            answer = await request(
                http, proxy.data_url, key=tenant.key, model=ALPHA, headers=COST_KNOBS
            )
            if answer.status == 200:
                admitted.append(answer)
            else:
                refusals += 1
                refused.append(answer)

    started = time.monotonic()
    await asyncio.gather(*(client_of(p) for p in pair))
    elapsed = time.monotonic() - started
    refill = TPM * elapsed / 60
    spent = len(admitted) * PER_ANSWER
    assert spent <= TPM + refill + 2 * PER_ANSWER, (len(admitted), elapsed)
    assert spent >= TPM - PER_ANSWER, (len(admitted), elapsed)  # the budget was usable
    for answer in admitted:
        assert answer.headers["x-ratelimit-limit-tokens"] == str(TPM)
        for name in TOKEN_HEADERS:
            assert name in answer.headers
    for answer in refused:
        assert_error(answer, "rate_limit_exceeded")
        assert answer.headers["x-ratelimit-remaining-tokens"] == "0"
        assert 1 <= int(answer.headers["retry-after"]) <= 60 * 3 * PER_ANSWER // TPM + 1
    # Another program of the same workspace has no token limit.
    await seed.grant(f"workspace:{tenant.workspace}")
    other = await request(http, pair[0].data_url, key=tenant.key, model="gpt-5.6-sol")
    assert other.status == 200 and "x-ratelimit-limit-tokens" not in other.headers


async def test_a_restricted_tier_scales_the_token_budget(
    pair: tuple[ServeProcess, ServeProcess], seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await seed.tenant()
    await seed.grant(f"workspace:{tenant.workspace}", ALPHA)
    first = await request(http, pair[0].data_url, key=tenant.key, model=ALPHA)
    assert first.headers["x-ratelimit-limit-tokens"] == str(TPM)
    misuse = config.load(BASE_CONFIG).misuse  # restricted from score 3: limits x 0.2
    flag = Flag(at=time.time(), category="spam", severity=3, source="analyst", note=None)
    await seed.writes.add_flag(Actor("e2e", "e2e"), tenant.workspace, flag, misuse)

    async def scaled() -> bool:
        answer = await request(http, pair[1].data_url, key=tenant.key, model=ALPHA)
        return answer.headers.get("x-ratelimit-limit-tokens") == str(TPM // 5)

    await wait_until(scaled, timeout=10, message="the restricted tier's token budget")


def _metric_sum(
    samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str
) -> float:
    return sum(
        v
        for n, got, v in samples
        if n == name and all(got.get(k) == v2 for k, v2 in labels.items())
    )


async def test_usage_per_day_equals_the_per_program_metrics(
    pair: tuple[ServeProcess, ServeProcess], seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await seed.tenant()
    await seed.grant(f"workspace:{tenant.workspace}")
    before = [await metric_samples(http, p.admin_url) for p in pair]
    knobs = [
        {
            "x-mock-prompt-tokens": "1000",
            "x-mock-cached-tokens": "400",
            "x-mock-completion-tokens": "7",
        },
        {
            "x-mock-prompt-tokens": "30",
            "x-mock-cache-write-tokens": "10",
            "x-mock-compress": "gzip",
        },
        {"x-mock-completion-tokens": "3", "x-mock-compress": "br"},
    ]
    sent = 0
    for i in range(12):
        proxy = pair[i % 2]
        h = knobs[i % 3]
        model = ("gpt-5.6-sol", "gpt-5.6-terra")[i % 2]
        body = chat_body(model, stream=bool(i % 4 == 1))  # some streams without include_usage
        answer = await request(http, proxy.data_url, key=tenant.key, json_body=body, headers=h)
        assert answer.status == 200, answer.body[:300]
        sent += 1
    today = datetime.datetime.now(datetime.UTC).date()
    query = {
        "from": (today - datetime.timedelta(days=1)).isoformat(),
        "to": (today + datetime.timedelta(days=1)).isoformat(),
    }
    url = f"{pair[0].admin_url}/admin/v1/workspaces/{tenant.workspace}/usage"
    headers = {"Authorization": f"Bearer {VIEW_TOKEN}"}

    async def all_written() -> bool:
        async with http.get(url, params=query, headers=headers) as resp:
            return (await resp.json())["requests"] == sent

    await wait_until(all_written, timeout=15, message="usage of every answer in Redis")
    async with http.get(url, params=query, headers=headers) as resp:
        assert resp.status == 200
        usage = await resp.json()
    after = [await metric_samples(http, p.admin_url) for p in pair]

    def delta(name: str, **labels: str) -> float:
        return sum(
            _metric_sum(a, name, **labels) - _metric_sum(b, name, **labels)
            for a, b in zip(after, before, strict=True)
        )

    assert [d["date"] for d in usage["days"]] == [query["from"], today.isoformat(), query["to"]]
    assert usage["retention_days"] == 7
    day_sum = {kind: sum(d["tokens"][kind] for d in usage["days"]) for kind in usage["tokens"]}
    assert day_sum == usage["tokens"]
    for kind, n in usage["tokens"].items():
        assert delta("access_proxy_tokens_total", program=PREVIEW, kind=kind) == n, kind
    assert math.isclose(
        delta("access_proxy_cost_usd_total", program=PREVIEW), usage["cost_usd"], rel_tol=1e-9
    )
    assert usage["tokens"]["cached_input"] == 4 * 400 and usage["cost_usd"] > 0

    # Without a range: the all-time totals, the same numbers for a workspace seen only today.
    async with http.get(url, headers=headers) as resp:
        total = await resp.json()
    assert total["tokens"] == usage["tokens"] and total["requests"] == sent
    # A single day by default; days a workspace had no traffic are zeros.
    async with http.get(url, params={"to": query["from"]}, headers=headers) as resp:
        quiet = await resp.json()
    assert [d["date"] for d in quiet["days"]] == [query["from"]] and quiet["requests"] == 0
    for bad in (
        {"from": "2026-13-01"},
        {"from": "yesterday"},
        {"from": "2026-1-1"},
        {"from": query["to"], "to": query["from"]},
        {"from": "2020-01-01", "to": "2026-01-01"},
        {"day": "2026-01-01"},
    ):
        async with http.get(url, params=bad, headers=headers) as resp:
            assert resp.status == 422, bad
            error = (await resp.json())["error"]
            assert error["param"] in bad, (bad, error)

    # The CLI shows the same days.
    env = {
        **os.environ,
        "ACCESS_PROXY_ADMIN_URL": pair[1].admin_url,
        "ACCESS_PROXY_ADMIN_TOKEN": VIEW_TOKEN,
    }
    args = ["usage", "show", tenant.workspace, "--from", query["from"], "--to", query["to"]]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.cli",
        "admin",
        "--json",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert json.loads(out) == usage
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.cli",
        "admin",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    text = out.decode()
    assert today.isoformat() in text and "(sum)" in text and str(usage["tokens"]["input"]) in text
