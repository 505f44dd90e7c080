"""The container image end to end (SPEC §12): build it, run it, use it, stop it.

Run by ``make image-test``, not by ``make test``: it needs a Docker daemon and root. It builds the
Dockerfile's base image locally when it is absent (``deploy/docker/build-base-image.sh``:
debootstrap, for machines that reach Debian's archive but no registry), builds the image with the
CA bundle pip should trust passed as a BuildKit secret (``IMAGE_TEST_CA``, else the bundle that
``PIP_CERT`` / ``REQUESTS_CA_BUNDLE`` / ``SSL_CERT_FILE`` name, else the system default), then runs
the container as production would run it: read-only root filesystem, tmpfs for what must be
writable, the config and the pepper from read-only mounts, the upstream key from env, embedded
Redis. The mock upstream runs on the host; the container shares the host's network, so every
address is loopback. The test sends an allowed request and refused ones, updates the config as the
kubelet updates a ConfigMap volume (a symlink swap) and sees the change, holds a stream open
across SIGTERM (``docker stop``) and checks that it finishes and the container exits 0.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import shutil
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import free_port
from tests.e2e.conftest import MockProcess, start_mock

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("ACCESS_PROXY_IMAGE_TEST") != "1",
        reason="needs a Docker daemon and root: run `make image-test`",
    ),
    # The first test builds the base image (debootstrap) and the image: minutes, not seconds.
    pytest.mark.timeout(1200),
]

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("IMAGE_TEST_TAG", "access-proxy:image-test")
UID = 10001
START_DEADLINE_S = 90.0
STOP_DEADLINE_S = 60
UPSTREAM_KEY = "image-test-upstream-key"


def say(*parts: object) -> None:
    print("[image-test]", *parts, flush=True)


def run(cmd: list[str], *, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    return done


def docker_client() -> str:
    """A docker client that builds with BuildKit: ``$DOCKER``, else the first ``docker`` on PATH
    with the buildx plugin, or old enough (< 23) to carry BuildKit itself."""
    explicit = os.environ.get("DOCKER")
    found = [explicit] if explicit else []
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(entry) / "docker"
        if candidate.is_file() and os.access(candidate, os.X_OK) and str(candidate) not in found:
            found.append(str(candidate))
    for cli in found:
        if run([cli, "buildx", "version"], check=False).returncode == 0:
            return cli
        version = run([cli, "version", "--format", "{{.Client.Version}}"], check=False).stdout
        major = version.strip().split(".")[0]
        if major.isdigit() and int(major) < 23:
            return cli
    pytest.fail(f"no docker client that builds with BuildKit among {found}: install buildx")


def ca_bundle() -> str | None:
    for name in ("IMAGE_TEST_CA", "PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = os.environ.get(name)
        if value and Path(value).is_file():
            return value
    default = ssl.get_default_verify_paths().cafile
    return default if default and Path(default).is_file() else None


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The docker client; when no daemon answers, a dockerd of our own for this module."""
    cli = docker_client()
    info = run([cli, "info", "--format", "{{.ServerVersion}}"], check=False)
    daemon: subprocess.Popen[bytes] | None = None
    if info.returncode != 0:
        dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
        if os.geteuid() != 0 or not Path(dockerd).is_file():
            pytest.fail(f"no Docker daemon answers ({cli} info) and none can be started here")
        log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
        with log.open("wb") as out:
            daemon = subprocess.Popen([dockerd], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_DEADLINE_S
        while (
            info := run([cli, "info", "--format", "{{.ServerVersion}}"], check=False)
        ).returncode:
            if daemon.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dockerd did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        say(f"started dockerd (pid {daemon.pid}), log {log}")
    say(f"docker client {cli}, daemon {info.stdout.strip()}")
    try:
        yield cli
    finally:
        if daemon is not None:
            daemon.terminate()
            try:
                daemon.wait(STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


@pytest.fixture(scope="module")
def image(docker: str) -> str:
    env = dict(os.environ, DOCKER=docker)
    base = run([str(REPO / "deploy/docker/build-base-image.sh")], env=env)
    say(base.stdout.strip())
    cmd = [docker, "build", "--progress=plain", "-t", IMAGE]
    ca = ca_bundle()
    if ca is not None:
        cmd += ["--secret", f"id=ca,src={ca}"]
    started = time.monotonic()
    built = run([*cmd, str(REPO)], env=dict(env, DOCKER_BUILDKIT="1"))
    size = int(run([docker, "image", "inspect", "-f", "{{.Size}}", IMAGE]).stdout)
    say(f"built {IMAGE} in {time.monotonic() - started:.0f} s, {size / 1e6:.0f} MB")
    assert "Successfully installed" in built.stdout + built.stderr or "CACHED" in built.stderr
    return IMAGE


@pytest.fixture(scope="module")
def mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockProcess]:
    server = start_mock(tmp_path_factory.mktemp("mock"))
    try:
        yield server
    finally:
        server.stop()


def test_image_shape(docker: str, image: str) -> None:
    """Non-root, exec-form entrypoint, SIGTERM, a health check, nothing of the build left."""
    doc = json.loads(run([docker, "image", "inspect", image]).stdout)[0]["Config"]
    say("user", doc["User"], "entrypoint", doc["Entrypoint"], "cmd", doc["Cmd"])
    say("healthcheck", doc["Healthcheck"]["Test"], "stop signal", doc["StopSignal"])
    assert doc["User"] == f"{UID}:{UID}"
    assert doc["Entrypoint"] == ["access-proxy"] and doc["Cmd"] == ["serve"]
    assert doc["StopSignal"] == "SIGTERM"
    assert doc["Healthcheck"]["Test"][0] == "CMD"
    inside = run(
        [
            docker, "run", "--rm", "--entrypoint", "sh", image, "-c",
            "id -u; test ! -e /run/secrets/ca && echo no-ca; "
            "test ! -e /opt/venv/bin/pip && echo no-pip; "
            "python -c 'import proxy.redis_server as r; print(r.find_redis_server())'",
        ]
    ).stdout.split()  # fmt: skip
    say("inside:", inside)
    assert inside[:3] == [str(UID), "no-ca", "no-pip"]
    assert inside[3].endswith("redis-server")
    check = run([docker, "run", "--rm", image, "config", "check"])
    say("config check:", check.stdout.strip())


def container_config(tmp: Path, mock_url: str, data_port: int, admin_port: int) -> tuple[Path, str]:
    """A config dir and a secrets dir to mount read-only; the operator token."""
    token = secrets.token_urlsafe(24)
    doc: dict[str, Any] = yaml.safe_load((REPO / "config/proxy.yaml").read_text())
    doc["listen"] = {"host": "127.0.0.1", "port": data_port}
    doc["admin"]["listen"] = {"host": "127.0.0.1", "port": admin_port}
    doc["admin"]["tokens"] = [
        {
            "name": "image-test",
            "sha256": hashlib.sha256(token.encode()).hexdigest(),
            "roles": ["operator", "approver:provider"],
        },
        {
            "name": "gov",
            "sha256": hashlib.sha256(b"unused").hexdigest(),
            "roles": ["approver:government"],
        },
    ]
    doc["upstreams"]["models"]["url"] = mock_url
    doc["keys"] = {"pepper_file": "/run/secrets/access-proxy/pepper"}
    doc["shutdown_grace_s"] = 30
    config_dir, secret_dir = tmp / "config", tmp / "secrets"
    for d in (config_dir, secret_dir):
        d.mkdir()
        d.chmod(0o755)
    configmap_write(config_dir, doc)
    (config_dir / "proxy.yaml").symlink_to("..data/proxy.yaml")
    (secret_dir / "pepper").write_text("v1:" + secrets.token_urlsafe(32))
    (secret_dir / "pepper").chmod(0o644)
    tmp.chmod(0o755)
    return tmp, token


def configmap_write(config_dir: Path, doc: dict[str, Any]) -> None:
    """Write ``proxy.yaml`` as the kubelet updates a ConfigMap volume: into a new timestamped
    directory, then one rename of the ``..data`` symlink over the old one."""
    version = config_dir / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{uuid.uuid4().hex[:8]}"
    version.mkdir(mode=0o755)
    (version / "proxy.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    (version / "proxy.yaml").chmod(0o644)
    staged = config_dir / "..data_tmp"
    staged.symlink_to(version.name)
    staged.rename(config_dir / "..data")


class Container:
    def __init__(self, docker: str, name: str, mounts: Path) -> None:
        self.docker, self.name, self.mounts = docker, name, mounts

    def inspect(self, fmt: str) -> str:
        return run([self.docker, "inspect", "-f", fmt, self.name]).stdout.strip()

    def logs(self) -> str:
        done = run([self.docker, "logs", self.name], check=False)
        return done.stdout + done.stderr

    def admin(self, admin_url: str, token: str, *args: str) -> Any:
        """``access-proxy admin`` run inside the container, as an operator would."""
        cmd = [self.docker, "exec", self.name, "access-proxy", "admin", "--json"]
        out = run([*cmd, "--url", admin_url, "--token", token, *args]).stdout
        return json.loads(out)

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            if self.inspect("{{.State.Running}}") != "true":
                raise AssertionError(f"the container stopped:\n{self.logs()}")
            if self.inspect("{{.State.Health.Status}}") == "healthy":
                return
            time.sleep(0.5)
        raise AssertionError(f"not healthy within {START_DEADLINE_S} s:\n{self.logs()}")


@pytest.fixture(params=[1, 2], ids=["serve", "serve --workers 2"])
def container(
    request: pytest.FixtureRequest, docker: str, image: str, mock: MockProcess, tmp_path: Path
) -> Iterator[Any]:
    """The container, as the Kubernetes Deployment runs it (read-only root, writable tmpfs where
    the state dir and the workers' metrics files go), with one process or two workers."""
    workers: int = request.param
    data_port, admin_port = free_port(), free_port()
    mounts, token = container_config(tmp_path, mock.url, data_port, admin_port)
    name = f"access-proxy-test-{uuid.uuid4().hex[:8]}"
    cmd = [
        docker, "run", "--detach", "--name", name, "--network", "host",
        "--read-only", "--tmpfs", "/tmp",
        "--tmpfs", f"/var/lib/access-proxy:uid={UID},gid={UID},mode=0750",
        "--volume", f"{mounts / 'config'}:/etc/access-proxy:ro",
        "--volume", f"{mounts / 'secrets'}:/run/secrets/access-proxy:ro",
        "--env", f"UPSTREAM_API_KEY={UPSTREAM_KEY}",
        "--health-interval", "1s", "--health-start-period", "60s",
        image, "serve", "--workers", str(workers),
    ]  # fmt: skip
    run(cmd)
    box = Container(docker, name, mounts)
    try:
        box.wait_healthy()
        say(
            f"container {name}, {workers} worker(s), healthy: data :{data_port} admin :{admin_port}"
        )
        yield box, data_port, admin_port, token
    finally:
        say("container log:\n" + box.logs())
        run([docker, "rm", "--force", name], check=False)


async def chat(
    session: aiohttp.ClientSession, port: int, key: str, model: str, **headers: str
) -> tuple[int, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "hello from the image"}]}
    async with session.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}", **headers},
    ) as resp:
        return resp.status, await resp.json()


async def test_serve_allow_refuse_and_drain_on_sigterm(
    container: tuple[Container, int, int, str], mock: MockProcess
) -> None:
    box, data_port, admin_port, token = container
    admin_url = f"http://127.0.0.1:{admin_port}"
    org = box.admin(admin_url, token, "orgs", "create", "acme", "--name", "Acme")
    box.admin(admin_url, token, "workspaces", "create", "acme-research", "--org", org["id"])
    issued = box.admin(admin_url, token, "keys", "issue", "acme-research")
    grant = box.admin(
        admin_url, token, "grants", "request",
        "--program", "gpt-5.5-alpha", "--product", "api", "--subject", "org:acme",
    )  # fmt: skip
    gid = grant["grant_id"]
    box.admin(admin_url, token, "grants", "approve", gid, "--role", "provider", "--reviewer", "al")
    box.admin(admin_url, token, "grants", "enable", gid)
    key = issued["key"]
    say(f"seeded through the admin CLI in the container: org acme, key {issued['key_id']}, {gid}")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async with session.delete(f"{mock.url}/_mock/requests") as resp:
            assert resp.status in (200, 204)
        status, body = await chat(session, data_port, key, "gpt-5.5-alpha")
        say("allowed   gpt-5.5-alpha with a grant:", status, body["choices"][0]["message"])
        assert status == 200 and body["model"] == "gpt-5.5-alpha"
        status, body = await chat(session, data_port, key, "gpt-5.6-sol")
        say("refused   gpt-5.6-sol without a grant:", status, body["error"]["code"])
        assert (status, body["error"]["code"]) == (404, "model_not_found")
        status, body = await chat(session, data_port, "sk-ap-not-a-key", "gpt-5.5-alpha")
        say("refused   a made-up key:", status, body["error"]["code"])
        assert (status, body["error"]["code"]) == (401, "invalid_api_key")
        async with session.get(f"{mock.url}/_mock/requests") as resp:
            seen = (await resp.json())["requests"]
        auth = [v for r in seen for k, v in r["headers"] if k.lower() == "authorization"]
        assert auth == [f"Bearer {UPSTREAM_KEY}"], auth  # one forwarded, with the env secret
        async with session.get(f"{admin_url}/metrics") as resp:
            metrics = await resp.text()
        counted = {
            code: sum(
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("access_proxy_requests_total{") and f'code="{code}"' in line
            )
            for code in ("ok", "model_not_found", "invalid_api_key")
        }
        say("/metrics access_proxy_requests_total by code:", counted)
        assert counted == {"ok": 1.0, "model_not_found": 1.0, "invalid_api_key": 1.0}

        # A ConfigMap-style update (symlink swap in the mounted directory) reaches the running
        # container: gpt-5.6-preview goes to general availability on the api product.
        config_dir = box.mounts / "config"
        doc = yaml.safe_load((config_dir / "proxy.yaml").read_text())
        doc["programs"]["gpt-5.6-preview"]["phases"]["api"] = "ga"
        configmap_write(config_dir, doc)
        # Every worker reloads: ten in a row on fresh connections (SO_REUSEPORT spreads them).
        deadline, in_a_row = time.monotonic() + 30, 0
        while in_a_row < 10:
            status = (await chat(session, data_port, key, "gpt-5.6-sol", Connection="close"))[0]
            in_a_row = in_a_row + 1 if status == 200 else 0
            assert status in (200, 404) and time.monotonic() < deadline, status
            await asyncio.sleep(0 if status == 200 else 0.2)
        say("allowed   gpt-5.6-sol after a ConfigMap-style swap to ga (10 in a row)")

        # A stream in flight when SIGTERM arrives finishes; then the container exits 0.
        stream_body = {
            "model": "gpt-5.5-alpha",
            "stream": True,
            "messages": [{"role": "user", "content": "drain me"}],
        }
        headers = {
            "Authorization": f"Bearer {key}",
            "x-mock-chunks": "20",
            "x-mock-chunk-delay-ms": "100",
        }
        async with session.post(
            f"http://127.0.0.1:{data_port}/v1/chat/completions", json=stream_body, headers=headers
        ) as resp:
            assert resp.status == 200
            first = await resp.content.readline()
            assert first.startswith(b"data: ")
            stopper = asyncio.create_task(
                asyncio.to_thread(
                    run, [box.docker, "stop", "--time", str(STOP_DEADLINE_S), box.name]
                )
            )
            rest = await resp.content.read()
        assert rest.rstrip().endswith(b"data: [DONE]"), rest[-200:]
        chunks = (first + rest).count(b"data: ")
        say(f"stream in flight across SIGTERM: {chunks} events, ends with [DONE]")
        await stopper
    code = box.inspect("{{.State.ExitCode}}")
    say(
        f"docker stop (SIGTERM): exit code {code}, OOM killed {box.inspect('{{.State.OOMKilled}}')}"
    )
    assert code == "0", box.logs()
    assert "Traceback" not in box.logs(), box.logs()
