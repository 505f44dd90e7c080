"""Shared fixtures for the whole suite: throwaway real Redis servers and polling helpers.

`free_port` and `wait_until` are plain functions, importable as
`from tests.conftest import free_port, wait_until`.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio

from proxy.redis_server import RedisServer


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_until(
    predicate: Callable[[], object | Awaitable[object]],
    timeout: float = 5.0,
    interval: float = 0.01,
    message: str | None = None,
) -> None:
    """Poll `predicate` (sync or async) until it is truthy; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = predicate()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__qualname__", repr(predicate))
            raise AssertionError(f"condition not met within {timeout} s: {what}")
        await asyncio.sleep(interval)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One non-persistent Redis for the whole session."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), persistent=False)
    server.start_sync()
    try:
        yield server
    finally:
        server.stop_sync()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session Redis's URL, flushed empty for this test."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """An asyncio client on a clean database."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own (persistent), which the test may stop and start again."""
    server = RedisServer(tmp_path / "private-redis")
    server.start_sync()
    try:
        yield server
    finally:
        server.stop_sync()
