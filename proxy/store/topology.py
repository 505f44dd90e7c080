"""The Redis URL forms of SPEC §2 and the clients each topology needs.

- ``redis://``, ``rediss://``, ``unix://``: one server.
- ``redis+sentinel://[[user]:password@]host:port[,host:port…]/SERVICE[/DB]``: the master named
  SERVICE, found through those Sentinels (redis-py's ``Sentinel``) and followed across failovers.
- ``redis+cluster://[[user]:password@]host:port[,host:port…]``: a Redis Cluster through those
  seed nodes.
``rediss+`` forms speak TLS to every node (and Sentinel). Query options: ``sentinel_password``
(when the Sentinels have a password of their own), ``ssl_ca_certs`` (a CA bundle for TLS).

:class:`Topology` hands out the clients a replica uses:
- ``client``: a ``redis.asyncio.Redis`` on the node holding the admin state (``schema.ADMIN``):
  the server, the current master, or the Cluster node owning the admin slot. Audited writes
  (WATCH/MULTI), entitlement reads, pub/sub and SCAN all run on it unchanged.
- ``data_client``: for the per-workspace traffic keys (usage): the same client, or redis-py's
  ``RedisCluster`` on a Cluster.
- ``resp``: the rate limiter's pipelined client, routed to the master or the slot owner.
"""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import parse_qs, unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.store.connection import make_client
from proxy.store.resp import Arg
from proxy.store.routing import ClusterResp, SentinelResp, SlotTable, slot_of, slot_owner_pool
from proxy.store.schema import ADMIN

Address = tuple[str, int]
AnyRedis = aioredis.Redis | RedisCluster
Kind = Literal["single", "sentinel", "cluster"]

_SINGLE_SCHEMES = ("redis", "rediss", "unix")
_SENTINEL_TIMEOUT_S = 0.5


class RespRouter(Protocol):
    """What the rate limiter needs of its RESP client (``resp.py``, ``routing.py``)."""

    async def call_for(self, key: str, *args: Arg) -> Any: ...

    def group(self, key: str) -> int: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed ``redis.url``."""

    kind: Kind
    url: str
    tls: bool = False
    nodes: tuple[Address, ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    ssl_ca_certs: str | None = None


def parse_url(url: str) -> RedisTarget:
    """Parse a Redis URL of SPEC §2; ``ValueError`` names what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError("a Redis URL looks like redis://host:port/0")
    if scheme in _SINGLE_SCHEMES:
        return RedisTarget("single", url, tls=scheme == "rediss")
    base, _, plus = scheme.partition("+")
    if base not in ("redis", "rediss") or plus not in ("sentinel", "cluster"):
        raise ValueError(
            f"unknown scheme {scheme!r}: use redis://, rediss://, unix://, "
            "redis+sentinel://, rediss+sentinel://, redis+cluster:// or rediss+cluster://"
        )
    rest, _, query_text = rest.partition("?")
    query = {k: v[-1] for k, v in parse_qs(query_text).items()}
    userinfo, _, hostpart = rest.rpartition("@")
    hosts, _, path = hostpart.partition("/")
    username, _, password = userinfo.partition(":")
    nodes = tuple(_host_port(h) for h in hosts.split(",") if h)
    if not nodes:
        raise ValueError(f"{scheme}:// needs at least one host:port")
    segments = [s for s in path.split("/") if s]
    service, db = "", 0
    if plus == "sentinel":
        if not segments or len(segments) > 2:
            raise ValueError(f"{scheme}:// needs the master's name: …host:port/SERVICE[/DB]")
        service = unquote(segments[0])
        if len(segments) == 2:
            if not segments[1].isdigit():
                raise ValueError(f"database must be a number, not {segments[1]!r}")
            db = int(segments[1])
    elif segments:
        raise ValueError("a Redis Cluster has one database: no path after the hosts")
    kind: Kind = "sentinel" if plus == "sentinel" else "cluster"
    return RedisTarget(
        kind,
        url,
        tls=base == "rediss",
        nodes=nodes,
        service=service,
        db=db,
        username=unquote(username) or None,
        password=unquote(password) if password else None,
        sentinel_password=query.get("sentinel_password"),
        ssl_ca_certs=query.get("ssl_ca_certs"),
    )


def _host_port(text: str) -> Address:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{text!r} is not host:port")
    return host.strip("[]"), int(port)


class Topology:
    """The clients for one ``redis.url``; ``aclose`` closes every one handed out."""

    def __init__(self, url: str) -> None:
        self.target = parse_url(url)
        self.kind = self.target.kind
        self._sentinel: Sentinel | None = None
        self._table: SlotTable | None = None
        self._owned: list[Any] = []

    @property
    def admin_slot(self) -> int:
        return slot_of(ADMIN)

    def _tls_context(self) -> ssl.SSLContext | None:
        if not self.target.tls:
            return None
        return ssl.create_default_context(cafile=self.target.ssl_ca_certs)

    def _tls_kwargs(self) -> dict[str, Any]:
        if not self.target.tls:
            return {}
        kwargs: dict[str, Any] = {"ssl": True}
        if self.target.ssl_ca_certs:
            kwargs["ssl_ca_certs"] = self.target.ssl_ca_certs
        return kwargs

    def _timeouts(self, timeout_s: float | None) -> dict[str, Any]:
        return {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s if timeout_s is not None else 5.0,
        }

    def sentinel(self) -> Sentinel:
        if self._sentinel is None:
            t = self.target
            sentinel_kwargs: dict[str, Any] = {
                **self._timeouts(_SENTINEL_TIMEOUT_S),
                **self._tls_kwargs(),
            }
            if t.sentinel_password:
                sentinel_kwargs["password"] = t.sentinel_password
            self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
                list(t.nodes),
                sentinel_kwargs=sentinel_kwargs,
                username=t.username,
                password=t.password,
                db=t.db,
                **self._tls_kwargs(),
            )
        return self._sentinel

    def slot_table(self) -> SlotTable:
        if self._table is None:
            t = self.target
            self._table = SlotTable(
                list(t.nodes), username=t.username, password=t.password, tls=self._tls_context()
            )
        return self._table

    def client(self, timeout_s: float | None, *, reconnect: bool = False) -> aioredis.Redis:
        """The client on the node holding the admin state (see the module docstring). With
        ``reconnect`` a command that finds its pooled connection closed is sent once more on a
        new one (``connection.make_client``)."""
        t = self.target
        retry = Retry(NoBackoff(), 1 if reconnect else 0, supported_errors=(RedisConnectionError,))
        common: dict[str, Any] = {"retry": retry, "health_check_interval": 0}
        client: aioredis.Redis
        if self.kind == "single":
            client = make_client(t.url, timeout_s=timeout_s, reconnect=reconnect)
        elif self.kind == "sentinel":
            client = self.sentinel().master_for(
                t.service, redis_class=aioredis.Redis, **common, **self._timeouts(timeout_s)
            )
        else:
            pool_kwargs: dict[str, Any] = {
                "host": t.nodes[0][0],
                "port": t.nodes[0][1],
                "username": t.username,
                "password": t.password,
                **self._timeouts(timeout_s),
                **common,
            }
            if t.tls:
                pool_kwargs["ssl_context"] = self._tls_context()
            client = aioredis.Redis(
                connection_pool=slot_owner_pool(self.slot_table(), self.admin_slot, **pool_kwargs)
            )
        self._owned.append(client)
        return client

    def data_client(self, timeout_s: float | None) -> AnyRedis:
        """For per-workspace keys: redis-py's ``RedisCluster`` on a Cluster, else ``client``."""
        if self.kind != "cluster":
            return self.client(timeout_s)
        t = self.target
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in t.nodes],
            username=t.username,
            password=t.password,
            **self._timeouts(timeout_s),
            **self._tls_kwargs(),
        )
        self._owned.append(cluster)
        return cluster

    def resp(self, connect_timeout_s: float) -> RespRouter | None:
        """The rate limiter's client; None on one server (the limiter makes its own)."""
        t = self.target
        router: RespRouter
        if self.kind == "single":
            return None
        if self.kind == "sentinel":
            router = SentinelResp(
                self.sentinel(),
                t.service,
                db=t.db,
                username=t.username,
                password=t.password,
                tls=self._tls_context(),
                connect_timeout_s=connect_timeout_s,
            )
        else:
            router = ClusterResp(
                self.slot_table(),
                username=t.username,
                password=t.password,
                tls=self._tls_context(),
                connect_timeout_s=connect_timeout_s,
            )
        self._owned.append(router)
        return router

    async def aclose(self) -> None:
        owned, self._owned = self._owned, []
        for thing in owned:
            with contextlib.suppress(Exception):
                if isinstance(thing, aioredis.Redis | RedisCluster):
                    await thing.aclose()
                else:
                    await thing.close()
        if self._sentinel is not None:
            for client in self._sentinel.sentinels:
                with contextlib.suppress(Exception):
                    await client.aclose()
