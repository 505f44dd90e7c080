"""The pipelined RESP2 client against real Redis: every reply type, many calls in flight on one
connection, connection loss and reconnection, AUTH and SELECT from the URL, a unix socket, and
the rate limiter's script fallback when Redis has forgotten the script."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from proxy.config import RateLimit
from proxy.redis_server import RedisServer
from proxy.store.connection import Breaker, Gate, make_client
from proxy.store.ratelimit import RateLimiter
from proxy.store.resp import RespConnection, RespError, encode
from tests.conftest import wait_until


@pytest.fixture
async def resp(redis_url: str) -> AsyncIterator[RespConnection]:
    conn = RespConnection.from_url(redis_url)
    try:
        yield conn
    finally:
        await conn.close()


def test_encode_is_an_array_of_bulk_strings() -> None:
    assert encode(("SET", b"k\r\n", 12)) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n"


async def test_every_reply_type(resp: RespConnection) -> None:
    assert await resp.call("PING") == "PONG"
    assert await resp.call("SET", "k", b"v\x00\r\n") == "OK"
    assert await resp.call("GET", "k") == b"v\x00\r\n"
    assert await resp.call("GET", "absent") is None
    assert await resp.call("INCR", "n") == 1
    assert await resp.call("INCRBY", "n", 41) == 42
    assert await resp.call("SET", "empty", "") == "OK"
    assert await resp.call("GET", "empty") == b""
    assert await resp.call("LRANGE", "no-list", 0, -1) == []
    assert await resp.call("EVAL", "return {1, 'a', {2, {'b', 3}}, {}}", 0) == [
        1,
        b"a",
        [2, [b"b", 3]],
        [],
    ]
    with pytest.raises(RespError, match=r"^WRONGTYPE"):
        await resp.call("LPUSH", "k", "x")
    with pytest.raises(RespError, match=r"^ERR unknown command"):
        await resp.call("NO-SUCH-COMMAND")
    # An error nested in an array is a value, not a raised error.
    nested = await resp.call("EVAL", "return {1, redis.error_reply('ERR inner')}", 0)
    assert nested[0] == 1
    assert isinstance(nested[1], RespError) and str(nested[1]) == "ERR inner"
    # The connection is still in step after the errors.
    assert await resp.call("GET", "k") == b"v\x00\r\n"


async def test_large_bulk_reply_arrives_in_pieces(resp: RespConnection) -> None:
    value = bytes(range(256)) * 4096  # 1 MiB: many reads of the socket
    assert await resp.call("SET", "big", value) == "OK"
    assert await resp.call("GET", "big") == value


async def test_many_calls_in_flight_resolve_in_order(resp: RespConnection) -> None:
    n = 500
    replies = await asyncio.gather(*(resp.call("INCR", "counter") for _ in range(n)))
    # Sent in order on one connection, so call i is answered by the i-th increment.
    assert replies == list(range(1, n + 1))
    echoed = await asyncio.gather(*(resp.call("ECHO", f"m{i}") for i in range(n)))
    assert echoed == [f"m{i}".encode() for i in range(n)]


async def test_a_caller_that_gives_up_does_not_shift_the_replies(
    resp: RespConnection, redis_client: aioredis.Redis
) -> None:
    popped = asyncio.ensure_future(resp.call("BLPOP", "queue", 0))
    await wait_until(lambda: resp._protocol is not None and len(resp._protocol.pending) == 1)
    popped.cancel()
    await redis_client.rpush("queue", "item")  # now Redis answers the abandoned BLPOP
    assert await resp.call("ECHO", "after") == b"after"
    assert popped.cancelled()


async def test_connection_loss_fails_pending_calls_and_later_calls_reconnect(
    private_redis: RedisServer,
) -> None:
    conn = RespConnection.from_url(private_redis.url, connect_timeout_s=2.0)
    try:
        assert await conn.call("SET", "survives", "yes") == "OK"
        # A blocking pop is pending when Redis goes away.
        pending = asyncio.ensure_future(conn.call("BLPOP", "never", 0))
        await wait_until(lambda: conn._protocol is not None and len(conn._protocol.pending) == 1)
        await private_redis.stop()
        with pytest.raises(ConnectionError):
            await pending
        assert not conn.connected
        with pytest.raises(OSError):
            await conn.call("PING")  # refused while Redis is down
        await private_redis.start()
        assert await conn.call("PING") == "PONG"
        assert await conn.call("GET", "survives") == b"yes"  # same server, after its AOF replay
    finally:
        await conn.close()


async def test_concurrent_callers_share_one_connect(redis_url: str) -> None:
    conn = RespConnection.from_url(redis_url)
    try:
        await asyncio.gather(*(conn.call("CLIENT", "SETNAME", "resp-test") for _ in range(50)))
        clients = await conn.call("CLIENT", "LIST")
        assert clients.count(b"name=resp-test") == 1
    finally:
        await conn.close()


async def test_close_fails_pending_calls(redis_url: str) -> None:
    conn = RespConnection.from_url(redis_url)
    await conn.call("PING")
    pending = asyncio.ensure_future(conn.call("BLPOP", "never", 0))
    await wait_until(lambda: conn._protocol is not None and len(conn._protocol.pending) == 1)
    await conn.close()
    with pytest.raises(ConnectionError):
        await pending


async def test_password_username_and_db_from_the_url(private_redis: RedisServer) -> None:
    admin = aioredis.Redis.from_url(private_redis.url)
    port = private_redis.port
    try:
        await admin.acl_setuser(
            "alice",
            enabled=True,
            passwords=["+a-pass"],
            keys=["*"],
            channels=["*"],
            commands=["+@all"],
        )
        await admin.config_set("requirepass", "s3cret")
        by_password = RespConnection.from_url(f"redis://:s3cret@127.0.0.1:{port}/3")
        by_user = RespConnection.from_url(f"redis://alice:a-pass@127.0.0.1:{port}/3")
        wrong = RespConnection.from_url(f"redis://:wrong@127.0.0.1:{port}/0")
        anonymous = RespConnection.from_url(f"redis://127.0.0.1:{port}/0")
        try:
            assert await by_password.call("SET", "where", "db3") == "OK"
            assert await by_user.call("GET", "where") == b"db3"
            assert await by_user.call("ACL", "WHOAMI") == b"alice"
            with pytest.raises(RespError, match="WRONGPASS"):
                await wrong.call("PING")
            with pytest.raises(RespError, match="NOAUTH"):
                await anonymous.call("GET", "where")
        finally:
            for conn in (by_password, by_user, wrong, anonymous):
                await conn.close()
        checker = aioredis.Redis.from_url(f"redis://:s3cret@127.0.0.1:{port}/3")
        try:
            assert await checker.get("where") == b"db3"
        finally:
            await checker.aclose()
    finally:
        await admin.aclose()
        unlocked = aioredis.Redis.from_url(f"redis://:s3cret@127.0.0.1:{port}/0")
        await unlocked.config_set("requirepass", "")
        await unlocked.aclose()


async def test_unix_socket_url(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "unix-redis", persistent=False, unix_socket=True)
    await server.start()
    try:
        assert server.unix_url is not None
        conn = RespConnection.from_url(server.unix_url.replace("db=0", "db=2"))
        try:
            assert await conn.call("SET", "via", "unix") == "OK"
            assert await conn.call("CLIENT", "INFO") is not None
        finally:
            await conn.close()
        checker = aioredis.Redis.from_url(server.url.removesuffix("/0") + "/2")
        try:
            assert await checker.get("via") == b"unix"
        finally:
            await checker.aclose()
    finally:
        await server.stop()


def test_url_parsing() -> None:
    conn = RespConnection.from_url("redis://u%40x:p%3Aw@example.test:7000/5")
    assert (conn.host, conn.port, conn.db, conn.username, conn.password) == (
        "example.test",
        7000,
        5,
        "u@x",
        "p:w",
    )
    plain = RespConnection.from_url("redis://localhost")
    assert (plain.host, plain.port, plain.db, plain.username, plain.password) == (
        "localhost",
        6379,
        0,
        None,
        None,
    )
    with pytest.raises(ValueError, match="scheme"):
        RespConnection.from_url("rediss://localhost")


async def test_rate_limiter_loads_the_script_when_redis_forgot_it(redis_url: str) -> None:
    client = make_client(redis_url, timeout_s=None)
    limiter = RateLimiter(client, Gate(2.0, Breaker(3, 0.05)), "resp-replica")
    rl = RateLimit(
        requests_per_minute=60, burst=2, concurrent=10, shadow=False, tokens_per_minute=None
    )
    try:
        await client.script_flush()
        first = await limiter.acquire("ws", None, rl)  # NOSCRIPT, then EVAL
        second = await limiter.acquire("ws", None, rl)  # EVALSHA finds it now
        third = await limiter.acquire("ws", None, rl)
        assert (first.mode, second.mode, third.mode) == ("redis", "redis", "redis")
        assert (first.allowed, second.allowed, third.allowed) == (True, True, False)
        assert third.reason == "rate"
        await client.script_flush()
        fourth = await limiter.acquire("ws", None, rl)
        assert fourth.mode == "redis" and not fourth.allowed
    finally:
        await limiter.stop()
        await client.aclose()
