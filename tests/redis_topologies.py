"""Real Redis topologies for the tests, from the same ``redis-server`` binary as the rest of the
suite: 1 master + 1 replica + 3 Sentinels, and a Redis Cluster of 3 masters (slots assigned here)
each with one replica.

Both are context managers that start every process on free loopback ports and stop them all;
``kill_master`` SIGKILLs the master that serves the admin state, for failover tests.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import redis

from proxy.redis_server import HOST, RedisServer, RedisServerError, find_redis_server
from proxy.store.routing import slot_of
from proxy.store.schema import ADMIN

SERVICE = "mymaster"
SLOTS = 16384
DOWN_AFTER_MS = 1000
NODE_TIMEOUT_MS = 1000
READY_DEADLINE_S = 30.0


class Node(RedisServer):
    """A non-persistent redis-server with extra arguments."""

    def __init__(self, data_dir: Path, extra: list[str], port: int | None = None) -> None:
        super().__init__(data_dir, persistent=False, port=port)
        self.extra = extra

    def command(self, port: int) -> list[str]:
        return [*super().command(port), *self.extra]

    def kill(self) -> None:
        """SIGKILL: no goodbye to replicas, Sentinels or the Cluster bus."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
        self.stop_sync()

    def client(self) -> redis.Redis:
        return redis.Redis(HOST, self.port, socket_timeout=5)


class SentinelNode(RedisServer):
    """``redis-server <conf> --sentinel`` watching ``master_port`` as SERVICE."""

    def __init__(self, data_dir: Path, master_port: int) -> None:
        super().__init__(data_dir, persistent=False)
        self.master_port = master_port

    def command(self, port: int) -> list[str]:
        conf = self.data_dir / "sentinel.conf"
        conf.write_text(
            f"port {port}\nbind {HOST}\ndir {self.data_dir}\n"
            f"sentinel monitor {SERVICE} {HOST} {self.master_port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} 5000\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        return [find_redis_server(), str(conf), "--sentinel"]


def _wait(what: str, check: object, deadline_s: float = READY_DEADLINE_S) -> None:
    assert callable(check)
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready within {deadline_s} s")
        time.sleep(0.05)


class SentinelTopology:
    def __init__(self, master: Node, replica: Node, sentinels: list[SentinelNode]) -> None:
        self.master = master
        self.replica = replica
        self.sentinels = sentinels

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def master_port(self) -> int:
        with redis.Redis(HOST, self.sentinels[0].port, socket_timeout=5) as s:
            _host, port = s.sentinel_get_master_addr_by_name(SERVICE)
        return int(port)

    def current_master(self) -> Node:
        port = self.master_port()
        return self.master if self.master.port == port else self.replica

    def flush(self) -> None:
        with self.current_master().client() as c:
            c.flushall()

    def kill_master(self) -> Node:
        """SIGKILL the master; the Sentinels promote the replica. Returns the killed node."""
        victim = self.current_master()
        victim.kill()
        return victim

    def wait_failover(self, old_port: int, deadline_s: float = READY_DEADLINE_S) -> None:
        _wait("sentinel failover", lambda: self.master_port() != old_port, deadline_s)


@contextmanager
def sentinel_topology(root: Path) -> Iterator[SentinelTopology]:
    with ExitStack() as stack:
        master = Node(root / "master", [])
        master.start_sync()
        stack.callback(master.stop_sync)
        replica = Node(root / "replica", ["--replicaof", HOST, str(master.port)])
        replica.start_sync()
        stack.callback(replica.stop_sync)
        _wait(
            "replica link",
            lambda: replica.client().info("replication").get("master_link_status") == "up",
        )
        sentinels = []
        for i in range(3):
            node = SentinelNode(root / f"sentinel-{i}", master.port)
            node.start_sync()
            stack.callback(node.stop_sync)
            sentinels.append(node)
        topo = SentinelTopology(master, replica, sentinels)

        def sentinels_see_everything() -> bool:
            for s in sentinels:
                with redis.Redis(HOST, s.port, socket_timeout=5) as c:
                    state = c.sentinel_master(SERVICE)
                    if int(state["num-slaves"]) < 1 or int(state["num-other-sentinels"]) < 2:
                        return False
            return True

        _wait("sentinels", sentinels_see_everything)
        yield topo


class ClusterTopology:
    def __init__(self, masters: list[Node], replicas: list[Node]) -> None:
        self.masters = masters
        self.replicas = replicas

    @property
    def nodes(self) -> list[Node]:
        return [n for n in (*self.masters, *self.replicas) if n.running]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{n.port}" for n in self.masters)
        return f"redis+cluster://{hosts}"

    def owner_of(self, slot: int) -> Node:
        for node in self.nodes:
            with node.client() as c:
                for start, end, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        port = int(primary[1])
                        for n in self.nodes:
                            if n.port == port:
                                return n
                        raise OSError(f"the owner of slot {slot} (port {port}) is down")
        raise AssertionError(f"no node serves slot {slot}")

    def admin_owner(self) -> Node:
        return self.owner_of(slot_of(ADMIN))

    def flush(self) -> None:
        for node in self.nodes:
            with node.client() as c:
                if c.info("replication")["role"] == "master":
                    c.flushall()

    def kill_master(self) -> Node:
        """SIGKILL the master holding the admin slot; its replica takes over."""
        victim = self.admin_owner()
        victim.kill()
        return victim

    def wait_failover(self, old_port: int, deadline_s: float = READY_DEADLINE_S) -> None:
        def promoted() -> bool:
            owner = self.admin_owner()
            with owner.client() as c:
                ok = c.cluster("info")["cluster_state"] == "ok"
            return owner.port != old_port and bool(ok)

        _wait("cluster failover", promoted, deadline_s)


def _cluster_port() -> int:
    """A free port whose Cluster bus port (port + 10000) is free too; both below 65536."""
    while True:
        port = random.randint(20000, 45000)
        if all(_port_free(p) for p in (port, port + 10000)):
            return port


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _start_cluster_node(d: Path, extra: list[str]) -> Node:
    for attempt in range(5):
        node = Node(d, [*extra, "--cluster-config-file", str(d / "nodes.conf")], _cluster_port())
        try:
            node.start_sync()
            return node
        except RedisServerError:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def _cluster_ok(nodes: list[Node]) -> bool:
    for node in nodes:
        with node.client() as c:
            if c.cluster("info")["cluster_state"] != "ok":
                return False
    return True


@contextmanager
def cluster_topology(root: Path, masters: int = 3) -> Iterator[ClusterTopology]:
    extra = [
        "--cluster-enabled",
        "yes",
        "--cluster-node-timeout",
        str(NODE_TIMEOUT_MS),
        # A failed master's slots stop; the other masters' slots keep serving.
        "--cluster-require-full-coverage",
        "no",
    ]
    with ExitStack() as stack:
        nodes: list[Node] = []
        for i in range(masters * 2):
            node = _start_cluster_node(root / f"node-{i}", extra)
            stack.callback(node.stop_sync)
            nodes.append(node)
        primaries, replicas = nodes[:masters], nodes[masters:]
        first = nodes[0]
        for node in nodes[1:]:
            with node.client() as c:
                c.execute_command("CLUSTER", "MEET", HOST, first.port)
        per = SLOTS // masters
        for i, node in enumerate(primaries):
            end = SLOTS if i == masters - 1 else (i + 1) * per
            with node.client() as c:
                c.execute_command("CLUSTER", "ADDSLOTS", *range(i * per, end))

        def everyone_met() -> bool:
            for node in nodes:
                with node.client() as c:
                    if len(c.execute_command("CLUSTER", "NODES").splitlines()) < len(nodes):
                        return False
            return True

        _wait("cluster meet", everyone_met)
        for primary, replica in zip(primaries, replicas, strict=True):
            with primary.client() as c:
                node_id = c.execute_command("CLUSTER", "MYID")
            with replica.client() as c:
                c.execute_command("CLUSTER", "REPLICATE", node_id)

        def replicas_synced() -> bool:
            for replica in replicas:
                with replica.client() as c:
                    if c.info("replication").get("master_link_status") != "up":
                        return False
            return _cluster_ok(nodes)

        _wait("cluster replicas", replicas_synced)
        yield ClusterTopology(primaries, replicas)
