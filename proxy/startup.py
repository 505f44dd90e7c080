"""Start-up checks, each failing with one line that names the cause and the fix (SPEC §2).

``serve`` and ``demo`` run these before they accept traffic: the state directory is writable,
the pepper is there and strong enough, the access log file opens, the embedded Redis starts or
the external one answers, the listen ports are free. Each failure is a :class:`StartupError`;
:func:`fail` prints it as one line on stderr and gives the exit code 1. Anything else that
escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import sys
import time
from pathlib import Path

from proxy import identity
from proxy.accesslog import STDERR
from proxy.config import AccessLogConfig, Config, ConfigError
from proxy.redis_server import RedisServer, RedisServerError
from proxy.store.topology import Topology

REDIS_DEADLINE_S = 5.0
_REDIS_RETRY_S = 0.2


class StartupError(Exception):
    """Why the process cannot start, and what to do about it."""

    def __init__(self, cause: str, fix: str) -> None:
        super().__init__(f"{cause}; {fix}")
        self.cause = cause
        self.fix = fix


def fail(exc: StartupError) -> int:
    """Print ``exc`` as one line on stderr; the exit code."""
    line = " ".join(str(exc).split())
    print(f"access-proxy: {line}", file=sys.stderr, flush=True)
    return 1


def invalid_config(exc: ConfigError) -> StartupError:
    if len(exc.issues) == 1 and exc.issues[0].message.startswith("cannot read file"):
        return StartupError(
            f"config file {exc.source}: {exc.issues[0].message}",
            "pass --config PATH or set ACCESS_PROXY_CONFIG (relative paths start where you are)",
        )
    first = exc.issues[0].format(exc.source) if exc.issues else exc.source
    more = len(exc.issues) - 1
    cause = f"invalid config {first}" + (f" (and {more} more)" if more > 0 else "")
    return StartupError(cause, f"`access-proxy config check {exc.source}` lists every error to fix")


def state_dir(path: str) -> Path:
    """The state directory, created if needed and proven writable."""
    where = Path(path)
    probe = where / f".write-test-{os.getpid()}"
    try:
        where.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartupError(
            f"state directory {path!r} is not writable ({exc.strerror or exc})",
            "make it writable by this user, or point state_dir in the config elsewhere",
        ) from None
    return where


def access_log_path(settings: AccessLogConfig) -> None:
    """The access log's file can be opened for appending (it is created if missing)."""
    if settings.mode == "off" or settings.path == STDERR:
        return
    try:
        fd = os.open(settings.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise StartupError(
            f"access log {settings.path!r} cannot be opened ({exc.strerror or exc})",
            "create its directory or make it writable, or set access_log.path (or stderr)",
        ) from None
    os.close(fd)


def peppers(cfg: Config, generated_in: str | None) -> identity.Peppers:
    """The peppers of ``cfg``; ``generated_in`` is where one may be generated (embedded Redis)."""
    env = cfg.keys.pepper_env
    try:
        return identity.load_peppers(env, cfg.keys.pepper_file, generated_in)
    except identity.PepperError as exc:
        cause = str(exc)
        if "no pepper" in cause:
            fix = (
                f"set env {env} to version:secret (16+ characters), e.g. "
                f'{env}="v1:$(openssl rand -base64 32)", or set keys.pepper_file'
            )
            cause = f"no pepper configured (env {env} and keys.pepper_file are unset)"
        else:
            fix = (
                f"set env {env} (or the file keys.pepper_file) to version:secret with a "
                "secret of at least 16 characters, e.g. v1:$(openssl rand -base64 32)"
            )
        raise StartupError(cause, fix) from None


async def start_embedded(server: RedisServer) -> None:
    try:
        await server.start()
    except RedisServerError as exc:
        raise _embedded_error(exc) from None
    except OSError as exc:
        raise _embedded_error(RedisServerError(f"redis-server could not run: {exc}")) from None


def start_embedded_sync(server: RedisServer) -> None:
    try:
        server.start_sync()
    except RedisServerError as exc:
        raise _embedded_error(exc) from None
    except OSError as exc:
        raise _embedded_error(RedisServerError(f"redis-server could not run: {exc}")) from None


def _embedded_error(exc: RedisServerError) -> StartupError:
    return StartupError(
        exc.brief,
        "fix what it names, or use an external Redis (env REDIS_URL or redis.url)",
    )


async def redis_reachable(url: str, deadline_s: float = REDIS_DEADLINE_S) -> None:
    """Return once Redis at ``url`` answers PING; give up after ``deadline_s``."""
    shown = redact(url)
    try:
        topology = Topology(url)
        client = topology.client(min(2.0, deadline_s))
    except ValueError as exc:
        raise StartupError(
            f"Redis URL {shown} is not usable ({exc})",
            "set REDIS_URL or redis.url to embedded or a URL of redis://, rediss://, unix://, "
            "redis+sentinel://, redis+cluster:// (or their rediss+ forms)",
        ) from None
    last = "no answer"
    end = time.monotonic() + deadline_s
    try:
        while True:
            try:
                if await client.ping():
                    return
            except Exception as exc:  # any failure to talk to Redis counts as unreachable
                last = " ".join(str(exc).split()) or type(exc).__name__
            if time.monotonic() >= end:
                break
            await asyncio.sleep(_REDIS_RETRY_S)
    finally:
        with contextlib.suppress(Exception):
            await topology.aclose()
    raise StartupError(
        f"Redis at {shown} is unreachable ({last})",
        "start it or fix REDIS_URL / redis.url (or use redis.url: embedded on one machine)",
    )


def redact(url: str) -> str:
    """``url`` without a password."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    creds, _, host = rest.partition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def bind_error(what: str, setting: str, host: str, port: int, exc: OSError) -> StartupError:
    if exc.errno == errno.EADDRINUSE:
        cause = f"{what} {host}:{port} is already in use"
        fix = f"stop the process listening there, or set {setting} to another port"
    else:
        cause = f"{what} cannot listen on {host}:{port} ({exc.strerror or exc})"
        fix = f"set {setting} to an address and port this user may bind"
    return StartupError(cause, fix)


def port_free(what: str, setting: str, host: str, port: int) -> None:
    """Fail now if ``host:port`` cannot be bound (before worker processes share it)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise bind_error(what, setting, host, port, exc) from None
