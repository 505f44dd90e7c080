"""Redis clients and the guard around hot-path calls: a short timeout and a circuit breaker, so
an outage adds no waiting to requests (SPEC §5)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy import metrics
from proxy.config import RedisConfig

T = TypeVar("T")


class RedisUnavailable(Exception):
    """Redis could not answer in time (error, timeout, or the breaker is open)."""


def make_client(url: str, *, timeout_s: float | None, reconnect: bool = False) -> aioredis.Redis:
    """A client with, when ``timeout_s`` is set, short socket timeouts, and no retries; with
    ``reconnect`` a command that finds its pooled connection closed (Redis restarted since) is
    sent once more on a new one. A timeout is never retried."""
    retry = Retry(NoBackoff(), 1 if reconnect else 0, supported_errors=(RedisConnectionError,))
    kwargs: dict[str, object] = {
        "retry": retry,
        "health_check_interval": 0,
    }
    if timeout_s is not None:
        kwargs["socket_timeout"] = timeout_s
        kwargs["socket_connect_timeout"] = timeout_s
    else:
        kwargs["socket_connect_timeout"] = 5.0
    return aioredis.Redis.from_url(url, **kwargs)  # type: ignore[arg-type]


class Breaker:
    """Opens after ``failures`` consecutive errors; every ``reset_s`` lets one trial call through.

    A trial that never reports back (its caller was cancelled) holds the breaker open only until
    the next ``reset_s`` has passed, when another trial may go.
    """

    def __init__(self, failures: int, reset_s: float) -> None:
        self.failures = failures
        self.reset_s = reset_s
        self._count = 0
        self._open_until = 0.0

    @property
    def is_open(self) -> bool:
        return self._count >= self.failures and time.monotonic() < self._open_until

    def allow(self) -> bool:
        if self._count < self.failures:
            return True
        now = time.monotonic()
        if now < self._open_until:
            return False
        self._open_until = now + self.reset_s  # half-open: this call decides
        return True

    def success(self) -> None:
        self._count = 0

    def retry_now(self) -> None:
        """Let the next call through as a trial at once (Redis was seen answering again)."""
        self._open_until = 0.0

    def failure(self) -> None:
        self._count += 1
        if self._count >= self.failures:
            self._open_until = time.monotonic() + self.reset_s


class Gate:
    """Runs hot-path Redis calls under a deadline and the breaker, counting errors by op."""

    def __init__(self, timeout_s: float, breaker: Breaker) -> None:
        self.timeout_s = timeout_s
        self.breaker = breaker

    @classmethod
    def of(cls, settings: RedisConfig) -> Gate:
        gate = cls(0.0, Breaker(0, 0.0))
        gate.configure(settings)
        return gate

    def configure(self, settings: RedisConfig) -> None:
        """Take the deadline and breaker settings of ``redis`` (at start and on every reload)."""
        self.timeout_s = settings.timeout_ms / 1000
        self.breaker.failures = settings.breaker_failures
        self.breaker.reset_s = settings.breaker_reset_s

    async def call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        if not self.breaker.allow():
            metrics.REDIS_ERRORS.labels(op).inc()
            raise RedisUnavailable(f"{op}: circuit open")
        try:
            async with asyncio.timeout(self.timeout_s):
                try:
                    result = await fn()
                except RedisConnectionError:
                    # Likely a pooled connection that Redis closed when it restarted; the failed
                    # one is dropped, so one more try runs on a new connection.
                    result = await fn()
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            self.breaker.failure()
            metrics.REDIS_ERRORS.labels(op).inc()
            raise RedisUnavailable(f"{op}: {type(exc).__name__}: {exc}") from exc
        self.breaker.success()
        return result
