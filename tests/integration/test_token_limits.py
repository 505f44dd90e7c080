"""Token limits (SPEC §6) on real Redis: the budget per minute, refusals with retry-after and the
token headers, metered tokens carried by the next call or a batched call (never a call of their
own on the request path), other replicas seeing them, shadow mode, the local share while Redis
is away, and the tier factor."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from proxy.config import RateLimit
from proxy.policy.decide import scaled
from proxy.redis_server import RedisServer
from proxy.store.connection import Breaker, Gate, make_client
from proxy.store.ratelimit import LimitResult, RateLimiter, Tokens
from proxy.store.schema import token_key
from tests.conftest import wait_until

MakeLimiter = Callable[..., Awaitable[RateLimiter]]


def rule(tpm: int | None, *, shadow: bool = False) -> RateLimit:
    return RateLimit(
        requests_per_minute=60_000,
        burst=1000,
        concurrent=1000,
        shadow=shadow,
        tokens_per_minute=tpm,
    )


@pytest.fixture
async def make_limiter() -> AsyncIterator[MakeLimiter]:
    made: list[tuple[RateLimiter, aioredis.Redis]] = []

    async def make(url: str, replica_id: str, *, timeout_s: float = 2.0, **kw: Any) -> RateLimiter:
        client = make_client(url, timeout_s=None)
        limiter = RateLimiter(client, Gate(timeout_s, Breaker(1, 0.1)), replica_id, **kw)
        made.append((limiter, client))
        return limiter

    yield make
    for limiter, client in made:
        await limiter.stop()
        await client.aclose()


class CountingGate(Gate):
    """A gate that counts the Redis calls made through it, by operation."""

    def __init__(self) -> None:
        super().__init__(2.0, Breaker(3, 0.1))
        self.calls: dict[str, int] = {}

    async def call(self, op: str, fn: Any) -> Any:
        self.calls[op] = self.calls.get(op, 0) + 1
        return await super().call(op, fn)


def test_token_headers() -> None:
    tokens = Tokens(limit=1000, remaining=250, reset_s=45.5)
    ok = LimitResult(True, True, 60, 59, 1.0, 0.0, None, "s", "redis", tokens)
    assert ok.headers()["x-ratelimit-limit-tokens"] == "1000"
    assert ok.headers()["x-ratelimit-remaining-tokens"] == "250"
    assert ok.headers()["x-ratelimit-reset-tokens"] == "45.5s"
    refused = dataclasses.replace(ok, allowed=False, would_allow=False, retry_after_s=2.2)
    assert refused.headers()["retry-after"] == "3"
    assert "x-ratelimit-limit-tokens" not in dataclasses.replace(ok, tokens=None).headers()


async def test_budget_spent_refuses_until_it_refills(
    redis_url: str, make_limiter: MakeLimiter
) -> None:
    limiter = await make_limiter(redis_url, "tk-a", token_flush_s=60)
    limit = rule(600)  # 10 tokens a second
    first = await limiter.acquire("ws-t1", "p", limit)
    assert first.allowed and first.tokens == Tokens(600, 600, 0.0)
    limiter.consume("ws-t1", "p", 450, 600)
    second = await limiter.acquire("ws-t1", "p", limit)  # carries the 450
    assert second.allowed and second.tokens is not None
    assert 150 <= second.tokens.remaining <= 151 and 44 < second.tokens.reset_s <= 45
    limiter.consume("ws-t1", "p", 250, 600)  # 100 over the budget
    refused = await limiter.acquire("ws-t1", "p", limit)
    assert not refused.allowed and refused.reason == "tokens" and refused.slot is None
    assert refused.tokens is not None and refused.tokens.remaining == 0
    # Back to one token of budget: 101 tokens at 10 a second.
    assert 9.9 < refused.retry_after_s <= 10.1
    headers = refused.headers()
    assert headers["retry-after"] == "11" and headers["x-ratelimit-remaining-tokens"] == "0"
    # Another workspace, and another program of the same workspace, have budgets of their own.
    assert (await limiter.acquire("ws-t2", "p", limit)).allowed
    assert (await limiter.acquire("ws-t1", "q", limit)).allowed


async def test_no_call_of_their_own_on_the_request_path(redis_url: str) -> None:
    gate = CountingGate()
    client = make_client(redis_url, timeout_s=None)
    limiter = RateLimiter(client, gate, "tk-count", token_flush_s=60)
    try:
        for _ in range(20):
            result = await limiter.acquire("ws-calls", "p", rule(600))
            assert result.allowed
            limiter.consume("ws-calls", "p", 7, 600)
        assert gate.calls == {"rate_limit": 20}
        last = await limiter.acquire("ws-calls", "p", rule(600))
        assert last.tokens is not None
        # Every token is in (10 a second flow back while the test runs).
        assert 600 - 20 * 7 <= last.tokens.remaining < 600 - 20 * 7 + 50
    finally:
        await limiter.stop()
        await client.aclose()


async def test_other_replicas_see_the_tokens_after_the_batched_flush(
    redis_url: str, redis_client: aioredis.Redis, make_limiter: MakeLimiter
) -> None:
    a = await make_limiter(redis_url, "tk-fa", token_flush_s=0.05)
    b = await make_limiter(redis_url, "tk-fb", token_flush_s=0.05)
    assert (await a.acquire("ws-flush", "p", rule(1000))).allowed
    for _ in range(5):
        a.consume("ws-flush", "p", 100, 1000)  # coalesced into one call

    async def b_sees_them() -> bool:
        result = await b.acquire("ws-flush", "p", rule(1000))
        return result.tokens is not None and result.tokens.remaining <= 500

    await wait_until(b_sees_them, timeout=10, message="the other replica sees the tokens")
    assert await redis_client.pttl(token_key("ws-flush", "p")) > 0  # the bucket expires
    # Stop flushes what is still held.
    a.consume("ws-flush", "p", 500, 1000)
    await a.stop()
    refused = await b.acquire("ws-flush", "p", rule(1000))
    assert not refused.allowed and refused.reason == "tokens"


async def test_shadow_token_limit_counts_and_lets_through(
    redis_url: str, make_limiter: MakeLimiter
) -> None:
    limiter = await make_limiter(redis_url, "tk-shadow", token_flush_s=60)

    def shadows() -> float:
        return (
            REGISTRY.get_sample_value(
                "access_proxy_shadow_decisions_total", {"rule": "token_limit"}
            )
            or 0.0
        )

    before = shadows()
    assert (await limiter.acquire("ws-sh", "p", rule(100, shadow=True))).allowed
    limiter.consume("ws-sh", "p", 150, 100)
    over = await limiter.acquire("ws-sh", "p", rule(100, shadow=True))
    assert over.allowed and not over.would_allow and over.reason == "tokens"
    assert "retry-after" not in over.headers()
    assert shadows() - before == 1


async def test_local_share_of_the_token_budget_while_redis_is_away(
    private_redis: RedisServer, make_limiter: MakeLimiter
) -> None:
    limiter = await make_limiter(private_redis.url, "tk-local", timeout_s=0.5, token_flush_s=60)
    limiter.replicas = 2  # as the heartbeat would have counted
    await private_redis.stop()
    limit = rule(1000)  # this replica's share: 500
    first = await limiter.acquire("ws-loc", "p", limit)
    assert first.mode == "local" and first.allowed
    assert first.tokens is not None and first.tokens.limit == 500
    limiter.consume("ws-loc", "p", 501, 1000)
    refused = await limiter.acquire("ws-loc", "p", limit)
    assert refused.mode == "local" and not refused.allowed and refused.reason == "tokens"
    assert refused.tokens is not None and refused.tokens.remaining == 0
    assert math.isclose(refused.retry_after_s, 2 * 60 / 500, rel_tol=0.05)


def test_tier_factor_scales_the_token_budget() -> None:
    assert scaled(rule(1000), 0.2).tokens_per_minute == 200
    assert scaled(rule(3), 0.1).tokens_per_minute == 1
    assert scaled(rule(None), 0.2).tokens_per_minute is None
