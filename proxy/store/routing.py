"""Finding the right Redis node when there is more than one: the master behind Sentinels, and the
owner of a slot in a Redis Cluster.

- :class:`SlotTable` knows which Cluster node serves each of the 16384 slots (``CLUSTER SLOTS``),
  learns from ``-MOVED`` replies at once and refreshes itself in the background after errors.
- :class:`SlotOwnerConnection` is a redis-py connection that always connects to the node owning
  one slot: the admin state lives in one slot (``schema.ADMIN``), so a plain ``redis.asyncio.Redis``
  on these connections runs WATCH/MULTI transactions, SCAN and pub/sub there unchanged, and follows
  a failover or a resharding by reconnecting.
- :class:`SentinelResp` and :class:`ClusterResp` give the rate limiter's pipelined RESP client
  (``resp.py``) the same reach: the master found through the Sentinels, rediscovered when the
  connection breaks or the node turns read-only; the slot owner in a Cluster, with ``-MOVED`` and
  ``-ASK`` redirections followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, MovedError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.store.resp import Arg, RespConnection, RespConnectionLost, RespError

log = logging.getLogger(__name__)

SLOTS = 16384
Address = tuple[str, int]
_REFRESH_MIN_INTERVAL_S = 0.1
_MAX_REDIRECTS = 5


def slot_of(key: str) -> int:
    return int(key_slot(key.encode("utf-8")))


class SlotTable:
    """Slot -> primary node of a Redis Cluster, from ``CLUSTER SLOTS`` of any reachable node."""

    def __init__(
        self,
        seeds: list[Address],
        *,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        timeout_s: float = 1.0,
    ) -> None:
        self.seeds = list(seeds)
        self.username = username
        self.password = password
        self.tls = tls
        self.timeout_s = timeout_s
        self.nodes: list[Address] = list(seeds)  # every node last seen, primaries first
        self._slots: list[Address | None] = [None] * SLOTS
        self._refreshing: asyncio.Task[None] | None = None
        self._last_refresh = 0.0

    def owner(self, slot: int) -> Address | None:
        return self._slots[slot]

    async def owner_now(self, slot: int) -> Address:
        """The slot's owner, asking the Cluster first when it is not known."""
        found = self._slots[slot]
        if found is None:
            await self.refresh()
            found = self._slots[slot]
        if found is None:
            raise RedisConnectionError(f"no Redis Cluster node serves slot {slot}")
        return found

    def moved(self, slot: int, address: Address) -> None:
        """A ``-MOVED`` reply names the new owner: use it at once, and refresh the rest."""
        self._slots[slot] = address
        self.request_refresh()

    def request_refresh(self) -> None:
        """Refresh in the background, at most once per 100 ms."""
        if self._refreshing is not None and not self._refreshing.done():
            return
        if time.monotonic() - self._last_refresh < _REFRESH_MIN_INTERVAL_S:
            return
        with contextlib.suppress(RuntimeError):  # no running loop: the next call asks
            self._refreshing = asyncio.ensure_future(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        with contextlib.suppress(RedisConnectionError):
            await self.refresh()

    async def refresh(self) -> None:
        """Read the slot map from the first node that answers (known nodes, then the seeds)."""
        self._last_refresh = time.monotonic()
        errors = []
        for address in dict.fromkeys([*self.nodes, *self.seeds]):
            conn = RespConnection(
                address[0],
                address[1],
                username=self.username,
                password=self.password,
                connect_timeout_s=self.timeout_s,
                tls=self.tls,
            )
            try:
                async with asyncio.timeout(self.timeout_s):
                    reply = await conn.call("CLUSTER", "SLOTS")
            except (OSError, TimeoutError, RespError, RespConnectionLost) as exc:
                errors.append(f"{address[0]}:{address[1]}: {exc}")
                continue
            finally:
                await conn.close()
            if self._apply(reply, address):
                return
            errors.append(f"{address[0]}:{address[1]}: the Cluster has no slots assigned")
        raise RedisConnectionError("no Redis Cluster node answered: " + "; ".join(errors))

    def _apply(self, reply: list[Any], asked: Address) -> bool:
        slots: list[Address | None] = [None] * SLOTS
        primaries: list[Address] = []
        replicas: list[Address] = []
        for entry in reply:
            start, end = int(entry[0]), int(entry[1])
            nodes = [_address(node, asked[0]) for node in entry[2:]]
            if not nodes:
                continue
            for slot in range(start, end + 1):
                slots[slot] = nodes[0]
            primaries.append(nodes[0])
            replicas.extend(nodes[1:])
        if not primaries:
            return False
        self._slots = slots
        self.nodes = list(dict.fromkeys([*primaries, *replicas]))
        return True


def _address(node: list[Any], asked_host: str) -> Address:
    host = node[0].decode() if isinstance(node[0], bytes) else str(node[0])
    return (host or asked_host, int(node[1]))


class SlotOwnerConnection(aioredis.Connection):
    """A redis-py connection to whichever Cluster node owns ``slot`` when it connects.

    A ``-MOVED`` reply (the slot moved, or this node was failed over to its replica) records the
    new owner and drops the connection, raising ``ConnectionError`` so the caller's retry (or the
    next call) reconnects to the new owner. Commands for other slots must not be sent here.
    """

    def __init__(self, *, slot_table: SlotTable, slot: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.slot_table = slot_table
        self.slot = slot

    async def connect(self) -> None:
        if self.is_connected:
            return
        self.host, self.port = await self.slot_table.owner_now(self.slot)
        try:
            await self.connect_check_health(check_health=True, retry_socket_connect=False)
        except (RedisConnectionError, RedisTimeoutError):
            self.slot_table.request_refresh()
            raise

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except MovedError as exc:
            self.slot_table.moved(exc.slot_id, (exc.host, exc.port))
            await self.disconnect()
            where = f"{exc.host}:{exc.port}"
            raise RedisConnectionError(f"slot {exc.slot_id} moved to {where}") from exc
        except (ClusterDownError, TryAgainError, RedisConnectionError, RedisTimeoutError):
            self.slot_table.request_refresh()
            raise


def slot_owner_pool(table: SlotTable, slot: int, **kwargs: Any) -> aioredis.ConnectionPool:
    """A redis-py pool whose connections go to the owner of ``slot``."""
    return aioredis.ConnectionPool(
        connection_class=SlotOwnerConnection, slot_table=table, slot=slot, **kwargs
    )


class ClusterResp:
    """The pipelined RESP client across a Redis Cluster: one connection per node, each call sent
    to the owner of its key's slot, ``-MOVED`` and ``-ASK`` followed."""

    def __init__(
        self,
        table: SlotTable,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.table = table
        self.username = username
        self.password = password
        self.tls = tls
        self.connect_timeout_s = connect_timeout_s
        self._conns: dict[Address, RespConnection] = {}

    def group(self, key: str) -> int:
        """Keys of one group may go in one script call: those of one slot."""
        return slot_of(key)

    def _conn(self, address: Address) -> RespConnection:
        conn = self._conns.get(address)
        if conn is None:
            conn = RespConnection(
                address[0],
                address[1],
                username=self.username,
                password=self.password,
                connect_timeout_s=self.connect_timeout_s,
                tls=self.tls,
            )
            self._conns[address] = conn
        return conn

    async def call_for(self, key: str, *args: Arg) -> Any:
        slot = slot_of(key)
        asking: Address | None = None
        for _ in range(_MAX_REDIRECTS):
            address = asking or await self.table.owner_now(slot)
            conn = self._conn(address)
            try:
                if asking is not None:
                    return await conn.call_asking(*args)
                return await conn.call(*args)
            except (OSError, TimeoutError):  # lost, or could not connect: the map may be stale
                self.table.request_refresh()
                raise
            except RespError as exc:
                redirect = _redirect(str(exc))
                if redirect is None:
                    if str(exc).startswith(("CLUSTERDOWN", "TRYAGAIN")):
                        self.table.request_refresh()
                    raise
                kind, moved_slot, target = redirect
                if kind == "MOVED":
                    self.table.moved(moved_slot, target)
                    asking = None
                else:
                    asking = target
        raise RespError(f"more than {_MAX_REDIRECTS} redirections for slot {slot}")

    async def close(self) -> None:
        conns, self._conns = self._conns, {}
        for conn in conns.values():
            await conn.close()


def _redirect(message: str) -> tuple[str, int, Address] | None:
    """``MOVED 3999 127.0.0.1:6381`` -> ("MOVED", 3999, ("127.0.0.1", 6381)); else None."""
    parts = message.split(" ")
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK"):
        return None
    host, _, port = parts[2].rpartition(":")
    return parts[0], int(parts[1]), (host, int(port))


class SentinelResp:
    """The pipelined RESP client on the master that the Sentinels name for ``service``.

    The master is looked up when a connection is needed; a broken connection, or a ``-READONLY``
    reply from a master since demoted to a replica, drops it so the next call looks up again.
    """

    def __init__(
        self,
        sentinel: Sentinel,
        service: str,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.sentinel = sentinel
        self.service = service
        self.db = db
        self.username = username
        self.password = password
        self.tls = tls
        self.connect_timeout_s = connect_timeout_s
        self._conn: RespConnection | None = None
        self._finding: asyncio.Task[RespConnection] | None = None

    def group(self, key: str) -> int:
        return 0

    async def _connection(self) -> RespConnection:
        if self._conn is not None:
            return self._conn
        if self._finding is None or self._finding.done():
            # Not tied to one caller's deadline: a caller that gives up leaves it running.
            self._finding = asyncio.ensure_future(self._find())
        return await asyncio.shield(self._finding)

    async def _find(self) -> RespConnection:
        host, port = await self.sentinel.discover_master(self.service)
        conn = RespConnection(
            str(host),
            int(port),
            db=self.db,
            username=self.username,
            password=self.password,
            connect_timeout_s=self.connect_timeout_s,
            tls=self.tls,
        )
        self._conn = conn
        return conn

    async def call_for(self, key: str, *args: Arg) -> Any:
        conn = await self._connection()
        try:
            return await conn.call(*args)
        except (OSError, TimeoutError):  # lost, or could not connect: ask the Sentinels again
            await self._drop(conn)
            raise
        except RespError as exc:
            if str(exc).startswith("READONLY"):
                await self._drop(conn)
                raise RespConnectionLost(f"the master moved: {exc}") from exc
            raise

    async def _drop(self, conn: RespConnection) -> None:
        if self._conn is conn:
            self._conn = None
        await conn.close()

    async def close(self) -> None:
        if self._finding is not None and not self._finding.done():
            self._finding.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
