"""Start-up failures are one line (SPEC §2): for each thing an operator can get wrong, ``serve``
(and ``demo``) prints exactly one line on stderr naming the cause and the fix, exits 1, shows no
traceback, and leaves no embedded redis-server behind."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import free_port
from tests.e2e.conftest import PEPPER, REPO, proxy_config
from tests.e2e.test_first_contact import assert_all_gone

RUN_DEADLINE_S = 60.0


def write_config(tmp_path: Path, **overrides: Any) -> tuple[Path, dict[str, Any]]:
    doc = proxy_config(
        upstream_url="http://127.0.0.1:9",
        dead_upstream_url="http://127.0.0.1:9",
        data_port=free_port(),
        admin_port=free_port(),
        state_dir=tmp_path / "state",
        overrides=overrides,
    )
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path, doc


def env_with(**values: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "ACCESS_PROXY_PEPPER", "ACCESS_PROXY_WORKER")
        and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env["UPSTREAM_API_KEY"] = "upstream-secret"
    env.update(values)
    return env


def one_line_failure(
    argv: list[str], env: dict[str, str], *, prefix: list[str] | None = None
) -> str:
    """Run ``access-proxy ARGV``; assert exit 1 and one line on stderr, no traceback; the line."""
    done = subprocess.run(
        [*(prefix or []), sys.executable, "-m", "proxy.cli", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_DEADLINE_S,
    )
    err = done.stderr
    assert done.returncode == 1, (done.returncode, err)
    assert "Traceback" not in err and "Traceback" not in done.stdout, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("access-proxy: "), err
    return lines[0]


def serve(config: Path, workers: int = 1) -> list[str]:
    return ["serve", "--config", str(config), "--workers", str(workers)]


@pytest.fixture
def occupied() -> Iterator[socket.socket]:
    """A port someone else listens on."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock
    finally:
        sock.close()


def test_invalid_config(tmp_path: Path) -> None:
    path, _ = write_config(tmp_path, listen={"host": "127.0.0.1", "port": "eighty"})
    line = one_line_failure(serve(path), env_with(ACCESS_PROXY_PEPPER=PEPPER))
    assert "invalid config" in line and "listen.port" in line, line
    assert f"access-proxy config check {path}" in line, line


def test_missing_config_file(tmp_path: Path) -> None:
    line = one_line_failure(serve(tmp_path / "nope.yaml"), env_with())
    assert "cannot read file: No such file" in line and "--config" in line, line


def test_missing_pepper_with_external_redis(tmp_path: Path, redis_url: str) -> None:
    path, _ = write_config(tmp_path)
    line = one_line_failure(serve(path), env_with(REDIS_URL=redis_url))
    assert "no pepper" in line and "set env ACCESS_PROXY_PEPPER" in line, line
    assert not (tmp_path / "state" / "pepper").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_weak_pepper(tmp_path: Path, redis_url: str, workers: int) -> None:
    path, _ = write_config(tmp_path)
    line = one_line_failure(
        serve(path, workers), env_with(REDIS_URL=redis_url, ACCESS_PROXY_PEPPER="v1:tooshort")
    )
    assert "shorter than 16 characters" in line and "ACCESS_PROXY_PEPPER" in line, line
    assert "tooshort" not in line, "the pepper itself is never printed"


def test_weak_pepper_file_with_embedded_redis(tmp_path: Path) -> None:
    weak = tmp_path / "pepper.txt"
    weak.write_text("v1:short\n")
    path, _ = write_config(tmp_path, keys={"pepper_file": str(weak)})
    line = one_line_failure(serve(path), env_with())
    assert "shorter than 16 characters" in line and "pepper_file" in line, line
    assert_all_gone(tmp_path / "state")


def test_redis_unreachable(tmp_path: Path) -> None:
    # A port that is bound but not listening refuses connections.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        url = f"redis://:hunter2-password@127.0.0.1:{silent.getsockname()[1]}/0"
        path, _ = write_config(tmp_path)
        line = one_line_failure(serve(path), env_with(REDIS_URL=url, ACCESS_PROXY_PEPPER=PEPPER))
    assert "unreachable" in line and "REDIS_URL" in line, line
    assert "hunter2" not in line, "the Redis password is never printed"


@pytest.mark.parametrize("workers", [1, 2])
def test_embedded_redis_that_cannot_start(tmp_path: Path, workers: int) -> None:
    path, _ = write_config(tmp_path)
    aof = tmp_path / "state" / "redis" / "appendonly.aof"
    aof.parent.mkdir(parents=True)
    aof.write_bytes(b"this is not an append-only file\r\n")
    line = one_line_failure(serve(path, workers), env_with())
    assert "redis-server" in line and "append only file" in line.lower(), line
    assert "redis.url" in line, line
    assert_all_gone(tmp_path / "state")


@pytest.mark.parametrize(
    ("listener", "setting", "workers"),
    [("data", "listen.port", 1), ("admin", "admin.listen.port", 1), ("data", "listen.port", 2)],
)
def test_port_in_use(
    tmp_path: Path, occupied: socket.socket, listener: str, setting: str, workers: int
) -> None:
    port = occupied.getsockname()[1]
    where = {"listen": {"host": "127.0.0.1", "port": port}}
    if listener == "admin":
        where = {"admin": {"listen": {"host": "127.0.0.1", "port": port}}}
    path, _ = write_config(tmp_path, **where)
    # Embedded Redis: it is up by the time the port fails, and must not be left behind.
    line = one_line_failure(serve(path, workers), env_with())
    assert f"{listener} listener 127.0.0.1:{port} is already in use" in line, line
    assert setting in line, line
    assert_all_gone(tmp_path / "state")


def test_demo_port_in_use(tmp_path: Path, occupied: socket.socket) -> None:
    port = occupied.getsockname()[1]
    argv = ["demo", "--port", str(port), "--admin-port", str(free_port())]
    argv += ["--upstream-port", str(free_port()), "--state-dir", str(tmp_path / "demo")]
    line = one_line_failure(argv, env_with())
    assert f"127.0.0.1:{port} is already in use" in line and "--port" in line, line
    assert_all_gone(tmp_path / "demo")


def _read_only_mounts_work(where: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount --bind {where} {where}"], capture_output=True
    )
    return probe.returncode == 0


def test_unwritable_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    if not _read_only_mounts_work(state):
        pytest.skip("needs unprivileged mount namespaces (unshare -rm)")
    path, _ = write_config(tmp_path)
    # A read-only bind mount: unwritable even for root, as a read-only volume would be.
    read_only = [
        "unshare",
        "-rm",
        "sh",
        "-c",
        f'mount --bind {state} {state} && mount -o remount,bind,ro {state} && exec "$@"',
        "sh",
    ]
    line = one_line_failure(serve(path), env_with(), prefix=read_only)
    assert f"state directory {str(state)!r} is not writable" in line, line
    assert "Read-only file system" in line and "state_dir" in line, line


@pytest.mark.parametrize("command", [["demo", "--state-dir", "STATE"], ["serve"]])
def test_an_install_missing_a_dependency(tmp_path: Path, command: list[str]) -> None:
    """An install older than the code (a dependency added since, here httptools hidden from the
    interpreter): one line naming the module and the fix, not a traceback."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['httptools'] = None\n")
    path, _ = write_config(tmp_path)
    argv = [str(tmp_path / "state") if a == "STATE" else a for a in command]
    if command == ["serve"]:
        argv += ["--config", str(path)]
    env = env_with(ACCESS_PROXY_PEPPER=PEPPER, PYTHONPATH=f"{hide}{os.pathsep}{REPO}")
    line = one_line_failure(argv, env)
    assert "'httptools' is not installed" in line and "make install" in line, line
