"""The Dockerfile and .dockerignore, read without Docker (``make image-test`` builds and runs the
image): the build context holds everything the Dockerfile copies, both stages start from the tag
the base-image script builds, and the final stage runs as a non-root user with an exec-form
entrypoint, SIGTERM as stop signal and a health check; the CA secret is only ever mounted."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def ignored(path: str) -> bool:
    """Docker's rule: the last matching .dockerignore line decides (``!`` re-includes)."""
    verdict = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        pattern = pattern[3:] if pattern.startswith("**/") else pattern
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes) or fnmatch.fnmatch(
            Path(path).name, pattern
        ):
            verdict = not negate
    return verdict


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    copies = [rest for word, rest in instructions() if word == "COPY" and "--from" not in rest]
    assert copies
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for args in copies:
        *sources, _dest = args.split()
        for source in sources:
            files = [f for f in tracked if f == source or f.startswith(source.rstrip("/") + "/")]
            assert files, f"COPY {source}: nothing tracked there"
            kept = [f for f in files if not ignored(f)]
            assert kept, f"COPY {source}: every file excluded by .dockerignore"
            if source.endswith(".py") or source.endswith(".toml"):
                assert kept == files
    # ...and little else: no virtualenv, state, tests or git history in the context.
    for unwanted in (".venv/bin/python", ".state/redis/dump.rdb", "tests/conftest.py", ".git/HEAD"):
        assert ignored(unwanted), unwanted


def test_both_stages_start_from_the_tag_the_base_script_builds() -> None:
    froms = [rest.split()[0] for word, rest in instructions() if word == "FROM"]
    assert len(froms) == 2, "multi-stage: a build stage and a runtime stage"
    assert len(set(froms)) == 1


def test_runtime_stage_shape() -> None:
    stage = dict(final_stage())
    user = stage["USER"].split(":")
    assert all(part.isdigit() and int(part) != 0 for part in user), "numeric non-root user"
    assert stage["STOPSIGNAL"] == "SIGTERM"
    assert json.loads(stage["ENTRYPOINT"]) == ["access-proxy"]
    assert json.loads(stage["CMD"]) == ["serve"]
    health = stage["HEALTHCHECK"]
    command = json.loads(health[health.index("CMD") + 3 :].strip())
    assert command[-1].endswith("healthcheck.py")
    assert "ACCESS_PROXY_CONFIG=/etc/access-proxy/proxy.yaml" in stage["ENV"]
    assert "--mount" not in " ".join(rest for word, rest in final_stage() if word == "RUN")


def test_ca_secret_is_only_mounted() -> None:
    text = DOCKERFILE.read_text()
    assert "--mount=type=secret,id=ca" in text
    assert text.count("/run/secrets/ca") == text.count("export PIP_CERT=/run/secrets/ca") + 1
    assert not re.search(r"^\s*(ARG|ENV)\s+\S*(CERT|CA_BUNDLE)", text, re.MULTILINE)
