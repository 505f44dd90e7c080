"""Usage and cost through the real proxy (SPEC §10): streamed and non-streamed answers are
metered per workspace in Redis and per program in metrics, with cache reads and writes priced."""

from __future__ import annotations

import math

import aiohttp

from proxy.store.usage import usage_key
from tests.conftest import wait_until
from tests.e2e.conftest import Seeder, Stack, assert_allowed, chat_body, metric_samples, request

SOL = "gpt-5.6-sol"
# prompt 1000 = 500 uncached + 400 cache reads + 100 cache writes; 200 out. At 15 / 60 USD per 1M,
# (500 x 15 + 400 x 1.5 + 100 x 18.75 + 200 x 60) / 1M = 0.021975 USD per answer.
COST = 0.021975
USAGE_KNOBS = {
    "x-mock-prompt-tokens": "1000",
    "x-mock-cached-tokens": "400",
    "x-mock-cache-write-tokens": "100",
    "x-mock-completion-tokens": "200",
}


def _cost(samples: list[tuple[str, dict[str, str], float]]) -> float:
    return sum(
        v
        for name, labels, v in samples
        if name == "access_proxy_cost_usd_total"
        and labels == {"program": "gpt-5.6-preview", "product": "api"}
    )


async def test_streamed_and_plain_answers_are_metered(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await seed.tenant()
    await seed.grant(f"workspace:{tenant.workspace}")
    base = stack.proxy.data_url
    before = _cost(await metric_samples(http, stack.proxy.admin_url))

    assert_allowed(await request(http, base, key=tenant.key, model=SOL, headers=USAGE_KNOBS))
    streamed = chat_body(SOL, stream=True, stream_options={"include_usage": True})
    answer = await request(http, base, key=tenant.key, json_body=streamed, headers=USAGE_KNOBS)
    assert answer.status == 200 and b"data: [DONE]" in answer.body

    async def written() -> bool:
        raw = await seed.data.hgetall(usage_key(tenant.workspace))
        return raw.get(b"requests") == b"2"

    await wait_until(written, timeout=10, message="usage written to Redis")
    raw = await seed.data.hgetall(usage_key(tenant.workspace))
    assert {k: raw[k.encode()] for k in ("input", "cached_input", "cache_write", "output")} == {
        "input": b"1000",
        "cached_input": b"800",
        "cache_write": b"200",
        "output": b"400",
    }
    assert math.isclose(float(raw[b"cost_usd"]), 2 * COST, rel_tol=1e-9)
    after = _cost(await metric_samples(http, stack.proxy.admin_url))
    assert math.isclose(after - before, 2 * COST, rel_tol=1e-9)
