"""deploy/docker/healthcheck.py, the image's HEALTHCHECK, against a real ``serve``: it finds the
admin listener through the config the proxy runs with, answers 0 while ``/healthz`` answers, and 1
when nothing listens there or the config cannot be read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import free_port
from tests.e2e.conftest import REPO, Stack

HEALTHCHECK = REPO / "deploy" / "docker" / "healthcheck.py"


def check(config: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ACCESS_PROXY_CONFIG=str(config))
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=30
    )


def test_healthy_while_the_admin_listener_answers(stack: Stack) -> None:
    done = check(stack.proxy.config_path)
    assert done.returncode == 0, done.stderr


def test_wildcard_admin_host_is_checked_on_loopback(stack: Stack, tmp_path: Path) -> None:
    doc = yaml.safe_load(stack.proxy.config_path.read_text())
    doc["admin"]["listen"]["host"] = "0.0.0.0"
    config = tmp_path / "wildcard.yaml"
    config.write_text(yaml.safe_dump(doc))
    assert check(config).returncode == 0


def test_unhealthy_when_nothing_answers(stack: Stack, tmp_path: Path) -> None:
    doc = yaml.safe_load(stack.proxy.config_path.read_text())
    doc["admin"]["listen"]["port"] = free_port()
    config = tmp_path / "closed.yaml"
    config.write_text(yaml.safe_dump(doc))
    done = check(config)
    assert done.returncode == 1
    assert "unhealthy" in done.stderr and str(doc["admin"]["listen"]["port"]) in done.stderr
    # No config at all: the default address (127.0.0.1:9090) is checked, never a crash.
    missing = check(tmp_path / "absent.yaml")
    assert missing.returncode in (0, 1) and "Traceback" not in missing.stderr
