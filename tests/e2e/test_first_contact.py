"""First contact, exactly as a new user has it (SPEC §2): from the root of a fresh copy of the
repository, with every default, no extra flags and none of the test suite's environment.

- ``make demo`` comes up, every command it prints works when pasted into a shell, and Ctrl-C
  (SIGINT to the foreground process group, as a terminal sends it) stops everything.
- ``access-proxy serve --config config/proxy.yaml`` becomes ready with the embedded Redis and its
  data in ``.state`` of that directory.
- ``access-proxy demo`` from a wheel of the package, started in an empty directory.

Every default means the default ports (8080, 9090, 8089), which other processes on this machine
may hold; so each run gets a private network namespace (an unprivileged user namespace with only
its own loopback, ``unshare -rn``) and the pasted commands join it with ``nsenter``. Nothing else
is changed: the same binaries, the same relative paths, the same cwd a user would have.

``make demo`` runs the Makefile's own recipe in the copy, pointed at this checkout's virtualenv
(``VENV=…`` and ``-o`` for its install stamp) rather than installing a second one from the
package index; the demo's code is this checkout's, and its cwd is the fresh copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO

VENV = Path(sys.executable).parent.parent
START_DEADLINE_S = 90.0
STOP_DEADLINE_S = 30.0
DEMO_READY = "Ctrl-C stops everything."
NSENTER = ("nsenter", "-U", "-n", "--preserve-credentials", "-t")
# The variables a developer's shell may carry from the test suite; a new user has none of them.
SUITE_ENV = (
    "REDIS_URL",
    "ACCESS_PROXY_PEPPER",
    "ACCESS_PROXY_CONFIG",
    "UPSTREAM_API_KEY",
    "ACCESS_PROXY_WORKER",
    "PROMETHEUS_MULTIPROC_DIR",
    "ACCESS_PROXY_ADMIN_URL",
    "ACCESS_PROXY_ADMIN_TOKEN",
    "PYTHONPATH",
)


def _namespaces_work() -> bool:
    if not (shutil.which("unshare") and shutil.which("nsenter") and shutil.which("ip")):
        return False
    probe = subprocess.run(
        ["unshare", "-rn", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(
    not _namespaces_work(), reason="needs unprivileged user and network namespaces (unshare -rn)"
)


def user_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SUITE_ENV}
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def fresh_copy(dest: Path) -> Path:
    """The repository as a clone would have it (tracked and new unignored files, nothing else)."""
    listing = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listing.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    assert not (dest / ".state").exists() and (dest / "config" / "proxy.yaml").is_file()
    return dest


@dataclass
class Isolated:
    """A command running in a private network namespace, as the leader of its process group."""

    proc: subprocess.Popen[bytes]
    out: Path
    cwd: Path

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, marker: str, deadline_s: float = START_DEADLINE_S) -> str:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            text = self.output()
            if marker in text:
                return text
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{marker!r} not printed (exit {self.proc.poll()}):\n{self.output()}")

    def shell(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``command`` in ``sh`` inside the namespace, as a user pasting it would."""
        return subprocess.run(
            [*NSENTER, str(self.proc.pid), "sh", "-c", command],
            cwd=self.cwd,
            env=user_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def ctrl_c(self) -> int:
        """SIGINT to the whole foreground group, as a terminal's Ctrl-C; the exit code."""
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after Ctrl-C:\n{self.output()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def isolated(tmp_path: Path) -> Iterator[list[Isolated]]:
    started: list[Isolated] = []
    yield started
    for run in started:
        run.kill()


def run_isolated(
    started: list[Isolated], argv: list[str], cwd: Path, env: dict[str, str]
) -> Isolated:
    out = cwd.parent / f"{cwd.name}-{len(started)}.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv],
            cwd=cwd,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    run = Isolated(proc, out, cwd)
    started.append(run)
    return run


def processes_under(root: Path) -> list[str]:
    """Processes whose cwd or command line lies in ``root`` (e.g. the embedded redis-server)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if str(root) in cmdline or cwd == str(root) or cwd.startswith(f"{root}/"):
            found.append(f"{entry.name}: {cmdline}")
    return found


def assert_all_gone(root: Path) -> None:
    deadline = time.monotonic() + STOP_DEADLINE_S
    while (left := processes_under(root)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, left


def printed_cases(out: str) -> list[tuple[str, str]]:
    """The ``# title`` (one or more comment lines) / command pairs under "Try them:"."""
    block = out.split("Try them:", 1)[1].split("\n\n", 1)[0]
    cases: list[tuple[str, str]] = []
    title: list[str] = []
    for line in (x.strip() for x in block.splitlines()):
        if line.startswith("# "):
            title.append(line[2:])
        elif line:
            assert title, f"a printed command without its comment: {line}"
            cases.append((" ".join(title), line))
            title = []
    return cases


def check_printed_case(title: str, result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (title, result.stderr)
    body = result.stdout
    assert body.strip(), title
    if title.startswith("allowed"):
        assert json.loads(body)["choices"], (title, body)
    elif m := re.match(r"(\d{3}) (\w+)", title):
        assert json.loads(body)["error"]["code"] == m.group(2), (title, body)
    elif title.startswith("realtime"):
        assert body.startswith("HTTP/1.1 404") and "model_not_found" in body, body
    elif title == "streaming":
        assert body.rstrip().endswith("data: [DONE]"), body[-300:]
    elif title.startswith("multipart"):
        assert json.loads(body)["error"]["code"] == "model_not_found", (title, body)
    elif title.startswith("token limit"):
        assert "x-ratelimit-remaining-tokens" in body.lower(), body
    elif title.startswith("usage and cost per UTC day"):
        assert json.loads(body)["days"][0]["requests"] >= 1, body
    elif title.startswith("what this key may use"):
        assert json.loads(body)["data"], body
    elif title.startswith(("why a request is refused", "the same through the operator CLI")):
        assert "access_not_yet_enabled" in body, body
    else:
        # A command added since: it must run and answer without a server error.
        assert not re.search(r"HTTP/1.1 5\d\d|internal_error", body), (title, body)


def test_make_demo_from_a_fresh_clone(tmp_path: Path, isolated: list[Isolated]) -> None:
    clone = fresh_copy(tmp_path / "clone")
    stamp = VENV / ".installed"
    assert stamp.exists(), "this checkout's virtualenv was not made by `make install`"
    make = ["make", "--no-print-directory", "demo", f"VENV={VENV}", "-o", str(stamp)]
    run = run_isolated(isolated, make, clone, user_env())
    out = run.wait_for(DEMO_READY)
    checked = [line for line in out.splitlines() if re.match(r"\s+(ok|\?\?) ", line)]
    assert len(checked) >= 10 and all(c.strip().startswith("ok ") for c in checked), out
    assert (clone / ".state" / "demo" / "redis").is_dir()

    exports = "; ".join(re.findall(r"^\s+(export ACCESS_PROXY_ADMIN_\w+=\S+)$", out, re.M))
    cases = printed_cases(out)
    assert len(cases) >= len(checked) + 3, cases
    for title, command in cases:
        if command.startswith("access-proxy admin"):
            command = f"{exports}; {command}"
        check_printed_case(title, run.shell(command))

    scripts = re.findall(r"^  python - <<'EOF'\n.*?^  EOF$", out, re.M | re.S)
    assert len(scripts) >= 2, out
    for printed in scripts:
        done = run.shell("\n".join(line[2:] for line in printed.splitlines()))
        assert done.returncode == 0, (printed, done.stderr)
        if "OpenAI(" in printed:
            assert "prompt_tokens" in done.stdout, done.stdout
        else:
            assert "session.created" in done.stdout and "response.done" in done.stdout, done.stdout
    metrics = re.search(r"^Metrics: (.*)$", out, re.M)
    assert metrics is not None
    done = run.shell(metrics.group(1))
    assert 'code="ok"' in done.stdout and 'code="access_suspended"' in done.stdout, done.stdout

    access_log = re.search(r"^Access log .*: tail -f (\S+)$", out, re.M)
    assert access_log is not None, out
    lines = [json.loads(x) for x in (clone / access_log.group(1)).read_text().splitlines()]
    assert {"ok", "access_suspended"} <= {line["code"] for line in lines}, lines

    run.ctrl_c()
    assert "Traceback" not in run.output(), run.output()
    assert_all_gone(clone)


def test_serve_with_the_shipped_config_from_a_fresh_clone(
    tmp_path: Path, isolated: list[Isolated]
) -> None:
    clone = fresh_copy(tmp_path / "clone")
    run = run_isolated(
        isolated, ["access-proxy", "serve", "--config", "config/proxy.yaml"], clone, user_env()
    )
    deadline = time.monotonic() + START_DEADLINE_S
    ready = None
    while time.monotonic() < deadline and run.proc.poll() is None:
        done = run.shell("curl -s http://127.0.0.1:9090/readyz")
        if '"ready"' in done.stdout:
            ready = json.loads(done.stdout)
            break
        time.sleep(0.2)
    assert ready is not None, run.output()
    assert ready["redis"] == "ok", ready
    # The data listener answers on its default port (no key: refused, never a 5xx).
    done = run.shell("curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8080/v1/models")
    assert done.stdout == "401", done
    state = clone / ".state"
    assert (state / "pepper").is_file() and (state / "redis" / "appendonly.aof").is_file()

    run.ctrl_c()
    assert run.proc.returncode == 0, run.output()
    assert "Traceback" not in run.output(), run.output()
    assert_all_gone(clone)


def test_installed_demo_works_from_any_directory(tmp_path: Path, isolated: list[Isolated]) -> None:
    clone = fresh_copy(tmp_path / "clone")
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(clone)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("access_proxy-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = user_env(PYTHONPATH=str(site))
    where = subprocess.run(
        [sys.executable, "-c", "import proxy; print(proxy.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(site)), where.stdout

    run = run_isolated(isolated, [sys.executable, "-m", "proxy.cli", "demo"], elsewhere, env)
    out = run.wait_for(DEMO_READY)
    checked = [line for line in out.splitlines() if re.match(r"\s+(ok|\?\?) ", line)]
    assert len(checked) >= 10 and all(c.strip().startswith("ok ") for c in checked), out
    assert (elsewhere / ".state" / "demo" / "redis").is_dir()
    assert run.ctrl_c() == 0, run.output()
    assert "Traceback" not in run.output(), run.output()
    assert_all_gone(elsewhere)
