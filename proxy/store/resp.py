"""A minimal pipelined RESP2 client for the one Redis call on the request path (the rate limit
script), where redis-py's command packing, pool and parser cost more CPU than the round trip.

One connection carries every call: a call writes its command at once and awaits a future, and the
replies, which Redis sends in command order, resolve the futures in FIFO order. A lost connection
fails every pending call with ``ConnectionError``; the next call connects again.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Mapping
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

Arg = bytes | str | int


class RespError(RedisError):
    """An error reply from Redis, e.g. ``NOSCRIPT No matching script``."""


class RespConnectionLost(RedisConnectionError, ConnectionError):
    """The connection closed or broke before the reply came.

    Both a builtin ``ConnectionError`` and redis-py's, so the hot-path gate gives it the one
    retry it gives a broken pooled connection.
    """


class _Incomplete(Exception):
    """The buffer ends inside a reply."""


def encode(args: tuple[Arg, ...]) -> bytes:
    """One command as a RESP2 array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode("utf-8")
        else:
            data = b"%d" % arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _parse(buf: bytearray, pos: int) -> tuple[Any, int]:
    """The reply starting at ``pos`` and the position after it; ``_Incomplete`` if cut short.

    An error reply is returned as a ``RespError`` value; the caller raises it at the top level.
    """
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    line = bytes(buf[pos + 1 : end])
    pos = end + 2
    if kind == 0x2B:  # +
        return line.decode("utf-8", "replace"), pos
    if kind == 0x3A:  # :
        return int(line), pos
    if kind == 0x24:  # $
        size = int(line)
        if size < 0:
            return None, pos
        if len(buf) < pos + size + 2:
            raise _Incomplete
        return bytes(buf[pos : pos + size]), pos + size + 2
    if kind == 0x2A:  # *
        count = int(line)
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 0x2D:  # -
        return RespError(line.decode("utf-8", "replace")), pos
    raise RespError(f"protocol error: unexpected reply type {chr(kind)!r}")


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.closed = False
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not a subclass of asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        pending = self.pending
        try:
            while pos < len(buf):
                try:
                    reply, pos = _parse(buf, pos)
                except _Incomplete:
                    break
                if not pending:
                    raise RespError("protocol error: a reply that no command asked for")
                future = pending.popleft()
                if future.done():  # its caller gave up (timeout or cancel)
                    continue
                if isinstance(reply, RespError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except (RespError, ValueError) as exc:
            self.fail(RespConnectionLost(f"Redis protocol error: {exc}"))
            return
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RespConnectionLost(f"connection to Redis lost: {exc or 'closed by peer'}"))

    def fail(self, exc: Exception) -> None:
        """Fail every pending call and close; later calls must connect again."""
        self.closed = True
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def send(self, command: bytes, future: asyncio.Future[Any]) -> None:
        assert self.transport is not None
        self.pending.append(future)
        self.transport.write(command)


class RespConnection:
    """One pipelined connection to a Redis server (TCP or a unix socket), connected lazily."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        *,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        connect_timeout_s: float = 5.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.path = path
        self.db = db
        self.username = username
        self.password = password
        self.connect_timeout_s = connect_timeout_s
        self.tls = tls
        self._protocol: _Protocol | None = None
        self._connecting = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str, *, connect_timeout_s: float = 5.0) -> RespConnection:
        """From ``redis://[[user]:password@]host[:port][/db]`` or ``unix:///path?db=N``."""
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        db_text = query.get("db", [""])[0] or parts.path.lstrip("/")
        if parts.scheme == "unix":
            return cls(
                path=unquote(parts.path),
                db=int(query.get("db", ["0"])[0]),
                username=unquote(parts.username) if parts.username else None,
                password=unquote(parts.password) if parts.password else None,
                connect_timeout_s=connect_timeout_s,
            )
        if parts.scheme != "redis":
            raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r}")
        return cls(
            parts.hostname or "127.0.0.1",
            parts.port or 6379,
            db=int(db_text or 0),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            connect_timeout_s=connect_timeout_s,
        )

    @classmethod
    def from_connection_kwargs(
        cls, kwargs: Mapping[str, Any], *, connect_timeout_s: float = 5.0
    ) -> RespConnection:
        """From a redis-py pool's ``connection_kwargs`` (plain TCP or unix socket only)."""
        return cls(
            str(kwargs.get("host", "127.0.0.1")),
            int(kwargs.get("port", 6379)),
            path=kwargs.get("path"),
            db=int(kwargs.get("db", 0) or 0),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            connect_timeout_s=connect_timeout_s,
        )

    @property
    def connected(self) -> bool:
        return self._protocol is not None and not self._protocol.closed

    async def call(self, *args: Arg) -> Any:
        """Send one command and await its reply; an error reply raises ``RespError``."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connect()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        protocol.send(encode(args), future)
        return await future

    async def call_for(self, key: str, *args: Arg) -> Any:
        """``call``: one server holds every key (the router interface, see ``routing.py``)."""
        return await self.call(*args)

    def group(self, key: str) -> int:
        """Keys of one group may go in one call: on one server, all of them."""
        return 0

    async def call_asking(self, *args: Arg) -> Any:
        """``ASKING`` and the command in one write, so no other call slips between them (a
        Cluster ``-ASK`` redirection admits only the very next command)."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connect()
        loop = asyncio.get_running_loop()
        asking: asyncio.Future[Any] = loop.create_future()
        future: asyncio.Future[Any] = loop.create_future()
        protocol.pending.append(asking)
        protocol.send(encode(("ASKING",)) + encode(args), future)
        await asking
        return await future

    async def _connect(self) -> _Protocol:
        async with self._connecting:
            protocol = self._protocol
            if protocol is not None and not protocol.closed:
                return protocol  # another caller connected while this one waited
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self.connect_timeout_s):
                if self.path is not None:
                    _, protocol = await loop.create_unix_connection(_Protocol, self.path)
                else:
                    _, protocol = await loop.create_connection(
                        _Protocol,
                        self.host,
                        self.port,
                        ssl=self.tls,
                        server_hostname=self.host if self.tls is not None else None,
                    )
                try:
                    await self._handshake(protocol)
                except BaseException:
                    protocol.fail(RespConnectionLost("connection setup failed"))
                    raise
            self._protocol = protocol
            return protocol

    async def _handshake(self, protocol: _Protocol) -> None:
        loop = asyncio.get_running_loop()
        commands: list[tuple[Arg, ...]] = []
        if self.password is not None:
            if self.username:
                commands.append(("AUTH", self.username, self.password))
            else:
                commands.append(("AUTH", self.password))
        if self.db:
            commands.append(("SELECT", self.db))
        futures = []
        for command in commands:
            future: asyncio.Future[Any] = loop.create_future()
            protocol.send(encode(command), future)
            futures.append(future)
        for future in futures:
            await future

    async def close(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.fail(RespConnectionLost("connection closed by the client"))
