"""`config check --diff`: what a new config changes in effect over an old one, which changes need
a restart, and that admin token hashes never show."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import config, configdiff
from proxy.configdiff import Change

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = Path(__file__).resolve().parent / "configs"
SHIPPED = ROOT / "config" / "proxy.yaml"
BASE: dict[str, Any] = yaml.safe_load(SHIPPED.read_text())

Mutation = Callable[[dict[str, Any]], None]


def changed(mutate: Mutation) -> list[str]:
    """The formatted lines for the shipped config against a copy changed by ``mutate``."""
    new = copy.deepcopy(BASE)
    mutate(new)
    old_cfg = config.parse(SHIPPED.read_text(), "old.yaml")
    new_cfg = config.parse(yaml.safe_dump(new), "new.yaml")
    text = configdiff.format_changes(configdiff.diff(old_cfg, new_cfg))
    return text.splitlines()


def test_identical_configs_have_no_changes() -> None:
    cfg = config.load(SHIPPED)
    assert configdiff.diff(cfg, cfg) == []
    assert configdiff.format_changes([]) == "no changes in effect"


def test_reformatting_and_reordering_is_not_a_change() -> None:
    def reorder(c: dict[str, Any]) -> None:
        c["routes"].reverse()
        c["programs"] = dict(reversed(c["programs"].items()))
        c["admin"]["tokens"].reverse()
        c["trusted_proxies"] = []

    # The YAML text differs (so does the version), the effect does not.
    assert changed(reorder) == ["no changes in effect"]


def _set(*path_and_value: Any) -> Mutation:
    *path, value = path_and_value

    def mutate(c: dict[str, Any]) -> None:
        target: Any = c
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(*path: Any) -> Mutation:
    def mutate(c: dict[str, Any]) -> None:
        target: Any = c
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


def _append(*path_and_value: Any) -> Mutation:
    *path, value = path_and_value

    def mutate(c: dict[str, Any]) -> None:
        target: Any = c
        for key in path:
            target = target[key]
        target.append(value)

    return mutate


NEW_TOKEN = "ab" * 32


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            _set("programs", "gpt-5.6-preview", "phases", "api", "ga"),
            ["~ programs.gpt-5.6-preview.phases.api: preview -> ga"],
        ),
        (
            _set("programs", "gpt-5.7-alpha", {"models": ["gpt-5.7-alpha"]}),
            [
                "+ programs.gpt-5.7-alpha: models [gpt-5.7-alpha], approvals [provider], "
                "phases api=closed, codex=closed, chatgpt=closed"
            ],
        ),
        (_delete("programs", "gpt-5.5-alpha"), ["- programs.gpt-5.5-alpha"]),
        (
            _append("programs", "gpt-5.6-preview", "models", "gpt-5.6-nova"),
            ["+ programs.gpt-5.6-preview.models[gpt-5.6-nova]"],
        ),
        (
            _set("programs", "gpt-5.6-preview", "models", ["gpt-5.6-sol"]),
            [
                "- programs.gpt-5.6-preview.models[gpt-5.6-terra]",
                "- programs.gpt-5.6-preview.models[gpt-5.6-luna]",
            ],
        ),
        (
            _set("programs", "gpt-5.5-alpha", "required_approvals", ["provider", "government"]),
            ["~ programs.gpt-5.5-alpha.required_approvals: [provider] -> [provider, government]"],
        ),
        (
            _set("programs", "gpt-5.5-alpha", "blocked_categories", ["cyber"]),
            ["+ programs.gpt-5.5-alpha.blocked_categories[cyber]"],
        ),
        (_delete("routes", 2), ["- routes[/chatgpt/v1/]"]),
        (
            _append("routes", {"path_prefix": "/v2/", "product": "api", "upstream": "models"}),
            ["+ routes[/v2/]: product api, upstream models"],
        ),
        (
            _set("routes", 1, "rewrite_prefix", "/v2/"),
            ["~ routes[/codex/v1/].rewrite_prefix: /v1/ -> /v2/"],
        ),
        (
            _set("routes", 0, "product", "codex"),
            ["~ routes[/v1/].product: api -> codex"],
        ),
        (
            _set("upstreams", "models", "url", "https://models.internal"),
            ["~ upstreams.models.url: http://127.0.0.1:8089 -> https://models.internal"],
        ),
        (
            _set("upstreams", "models", "timeouts", "first_byte_s", 30),
            ["~ upstreams.models.timeouts.first_byte_s: 120 -> 30"],
        ),
        (
            _set("upstreams", "spare", {"url": "http://10.0.0.2:8089"}),
            ["+ upstreams.spare: url http://10.0.0.2:8089"],
        ),
        (_set("unlisted_models", "deny"), ["~ unlisted_models: allow -> deny"]),
        (_set("trusted_proxies", ["10.0.0.0/8"]), ["+ trusted_proxies[10.0.0.0/8]"]),
        (
            _set("limits", "max_body_bytes", 1024),
            ["~ limits.max_body_bytes: 10485760 -> 1024"],
        ),
        (_set("cache", "ttl_seconds", 2.5), ["~ cache.ttl_seconds: 5 -> 2.5"]),
        (
            _set("misuse", "tiers", 1, "rate_limit_factor", 0.5),
            ["~ misuse.tiers.restricted.rate_limit_factor: 0.2 -> 0.5"],
        ),
        (
            _set("misuse", "tiers", 3, "min_score", 10),
            ["~ misuse.tiers.suspended.min_score: 8 -> 10"],
        ),
        (_delete("misuse", "tiers", 0), ["- misuse.tiers.watch"]),
        (
            _set("misuse", "classifier", "url", "http://127.0.0.1:9000/classify"),
            ["~ misuse.classifier.url: none -> http://127.0.0.1:9000/classify"],
        ),
        (
            _set("misuse", "classifier", "fail_mode", "open"),
            ["~ misuse.classifier.fail_mode: closed -> open"],
        ),
        (
            _set("rate_limits", "default", "requests_per_minute", 300),
            ["~ rate_limits.default.requests_per_minute: 600 -> 300"],
        ),
        (
            _set("rate_limits", "programs", "gpt-5.6-preview", "shadow", True),
            ["~ rate_limits.programs.gpt-5.6-preview.shadow: false -> true"],
        ),
        (
            _set("rate_limits", "programs", "gpt-5.5-alpha", {"requests_per_minute": 5}),
            [
                "+ rate_limits.programs.gpt-5.5-alpha: requests_per_minute 5, burst 60, "
                "concurrent 50, shadow false, tokens_per_minute none"
            ],
        ),
        (
            _set("pricing", "models", "gpt-5.6-sol", "output", 50.0),
            ["~ pricing.models.gpt-5.6-sol.output: 60 -> 50"],
        ),
        (
            _set("pricing", "cached_input_discount", 0.5),
            ["~ pricing.cached_input_discount: 0.9 -> 0.5"],
        ),
        (
            _append(
                "admin", "tokens", {"name": "new-ops", "sha256": NEW_TOKEN, "roles": ["operator"]}
            ),
            ["+ admin.tokens.new-ops: roles [operator]"],
        ),
        (_delete("admin", "tokens", 3), ["- admin.tokens.dashboards"]),
        (
            _set("admin", "tokens", 3, "roles", ["viewer", "operator"]),
            ["~ admin.tokens.dashboards.roles: [viewer] -> [viewer, operator]"],
        ),
        (
            _set("admin", "tokens", 0, "sha256", NEW_TOKEN),
            ["~ admin.tokens.ops.sha256: (hidden) -> (hidden, replaced)"],
        ),
        (_set("shutdown_grace_s", 5), ["~ shutdown_grace_s: 30 -> 5"]),
        (_set("redis", "timeout_ms", 20), ["~ redis.timeout_ms: 50 -> 20"]),
    ],
)
def test_each_kind_of_change_shows(mutate: Mutation, expected: list[str]) -> None:
    assert changed(mutate) == expected


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_set("listen", "port", 8081), "! listen: 0.0.0.0:8080 -> 0.0.0.0:8081 (needs a restart)"),
        (
            _set("admin", "listen", "host", "0.0.0.0"),
            "! admin.listen: 127.0.0.1:9090 -> 0.0.0.0:9090 (needs a restart)",
        ),
        (
            _set("redis", "url", "redis://10.0.0.5:6379/0"),
            "! redis.url: embedded -> redis://10.0.0.5:6379/0 (needs a restart)",
        ),
        (
            _set("state_dir", "/var/lib/access-proxy"),
            "! state_dir: .state -> /var/lib/access-proxy (needs a restart)",
        ),
    ],
)
def test_restart_only_change_is_flagged(mutate: Mutation, expected: str) -> None:
    assert changed(mutate) == [expected]
    new = copy.deepcopy(BASE)
    mutate(new)
    changes = configdiff.diff(config.load(SHIPPED), config.parse(yaml.safe_dump(new)))
    assert [c.restart_required for c in changes] == [True]
    assert changes[0].kind == "!"


def test_reloadable_changes_do_not_need_a_restart() -> None:
    new = copy.deepcopy(BASE)
    new["programs"]["gpt-5.6-preview"]["phases"]["chatgpt"] = "preview"
    new["unlisted_models"] = "deny"
    changes = configdiff.diff(config.load(SHIPPED), config.parse(yaml.safe_dump(new)))
    assert changes == [
        Change("programs", "programs.gpt-5.6-preview.phases.chatgpt", "closed", "preview", False),
        Change("programs", "unlisted_models", "allow", "deny", False),
    ]
    assert [c.kind for c in changes] == ["~", "~"]


def test_token_hashes_never_appear() -> None:
    def rotate_everything(c: dict[str, Any]) -> None:
        c["admin"]["tokens"][0]["sha256"] = NEW_TOKEN
        c["admin"]["tokens"][1]["roles"] = ["approver:provider", "viewer"]
        del c["admin"]["tokens"][2]
        c["admin"]["tokens"].append({"name": "extra", "sha256": "cd" * 32, "roles": ["viewer"]})
        c["programs"]["gpt-5.6-preview"]["required_approvals"] = ["provider"]

    lines = changed(rotate_everything)
    assert len(lines) == 5
    text = "\n".join(lines)
    hashes = [t["sha256"] for t in BASE["admin"]["tokens"]] + [NEW_TOKEN, "cd" * 32]
    for digest in hashes:
        assert digest not in text
        assert digest[:12] not in text


@settings(max_examples=40, deadline=None)
@given(
    program=st.sampled_from(sorted(BASE["programs"])),
    product=st.sampled_from(["api", "codex", "chatgpt"]),
    phase=st.sampled_from(list(config.PHASES)),
)
def test_a_phase_flip_is_exactly_one_change(program: str, product: str, phase: str) -> None:
    new = copy.deepcopy(BASE)
    before = new["programs"][program]["phases"][product]
    new["programs"][program]["phases"][product] = phase
    changes = configdiff.diff(config.load(SHIPPED), config.parse(yaml.safe_dump(new)))
    if phase == before:
        assert changes == []
    else:
        assert changes == [
            Change("programs", f"programs.{program}.phases.{product}", before, phase, False)
        ]


def test_diff_is_symmetric_in_kind() -> None:
    new = copy.deepcopy(BASE)
    new["routes"].append({"path_prefix": "/v2/", "product": "api", "upstream": "models"})
    old_cfg, new_cfg = config.load(SHIPPED), config.parse(yaml.safe_dump(new))
    assert [c.kind for c in configdiff.diff(old_cfg, new_cfg)] == ["+"]
    assert [c.kind for c in configdiff.diff(new_cfg, old_cfg)] == ["-"]


# --------------------------------------------------------------------------- the commands


def test_diff_command_in_process(tmp_path: Path) -> None:
    new = copy.deepcopy(BASE)
    new["programs"]["gpt-5.6-preview"]["phases"]["api"] = "ga"
    target = tmp_path / "new.yaml"
    target.write_text(yaml.safe_dump(new))
    out = io.StringIO()
    assert configdiff.diff_command(str(SHIPPED), str(target), out) == 0
    assert out.getvalue() == "~ programs.gpt-5.6-preview.phases.api: preview -> ga\n"


def test_diff_command_rejects_an_invalid_side(tmp_path: Path) -> None:
    out = io.StringIO()
    broken = CONFIGS / "invalid_phase.yaml"
    assert configdiff.diff_command(str(SHIPPED), str(broken), out) == 1
    assert out.getvalue().splitlines() == [
        f"{broken}:11: programs.gpt-5.6-preview.phases.codex: "
        "phase must be one of closed, preview, ga"
    ]
    out = io.StringIO()
    assert configdiff.diff_command(str(tmp_path / "absent.yaml"), str(SHIPPED), out) == 1
    assert "cannot read file" in out.getvalue()


def test_check_command_in_process() -> None:
    out = io.StringIO()
    assert configdiff.check_command(str(CONFIGS / "minimal.yaml"), out) == 0
    assert out.getvalue().count("\n") == 1 and ": ok, version " in out.getvalue()
    out = io.StringIO()
    assert configdiff.check_command(str(CONFIGS / "bad_url.yaml"), out) == 1
    assert ":4: upstreams.models.url: " in out.getvalue()


def run_diff(old: Path, new: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.configdiff", "diff", str(old), str(new)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_diff_command_as_a_subprocess(tmp_path: Path) -> None:
    new = copy.deepcopy(BASE)
    new["listen"]["port"] = 8081
    new["programs"]["gpt-5.6-preview"]["phases"]["api"] = "ga"
    new["admin"]["tokens"].append({"name": "new-ops", "sha256": NEW_TOKEN, "roles": ["operator"]})
    del new["routes"][2]
    target = tmp_path / "new.yaml"
    target.write_text(yaml.safe_dump(new))

    done = run_diff(SHIPPED, target)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        "! listen: 0.0.0.0:8080 -> 0.0.0.0:8081 (needs a restart)",
        "+ admin.tokens.new-ops: roles [operator]",
        "- routes[/chatgpt/v1/]",
        "~ programs.gpt-5.6-preview.phases.api: preview -> ga",
    ]
    assert NEW_TOKEN not in done.stdout

    same = run_diff(SHIPPED, SHIPPED)
    assert (same.returncode, same.stdout) == (0, "no changes in effect\n")

    broken = run_diff(SHIPPED, CONFIGS / "several_problems.yaml")
    assert broken.returncode == 1
    assert len(broken.stdout.splitlines()) == 9


# --------------------------------------------------------------------------- from the declarations


def _leaves(cls: type, path: str = "") -> list[tuple[str, config.Declared]]:
    """Every number or boolean a section declares, with its path (lists and maps aside)."""
    out: list[tuple[str, config.Declared]] = []
    for d in config.declared(cls):
        sub = f"{path}.{d.name}" if path else d.name
        if isinstance(d.kind, type):
            out += _leaves(d.kind, sub)
        elif isinstance(d.kind, tuple) and d.kind[0] in (int, float, bool):
            out.append((sub, d))
    return out


LEAVES = _leaves(config.Config)


def test_the_declarations_cover_the_known_settings() -> None:
    paths = {p for p, _ in LEAVES}
    assert {"redis.breaker_reset_s", "cache.max_entries", "rate_limits.enabled"} <= paths
    assert "listen.port" in paths and "misuse.classifier.timeout_ms" in paths


@pytest.mark.parametrize(("path", "declared"), LEAVES, ids=[p for p, _ in LEAVES])
def test_every_declared_setting_shows_in_the_diff_by_its_declaration(
    path: str, declared: config.Declared
) -> None:
    """A setting added to a section needs no line in the diff: a change to any declared number
    or boolean is one change at its path, flagged for restart exactly when declared so."""
    old_cfg = config.load(SHIPPED)
    current: Any = old_cfg
    for part in path.split("."):
        current = getattr(current, part)
    if isinstance(current, bool):
        value: Any = not current
    elif path in ("pricing.cached_input_discount", "access_log.sample"):  # fractions
        value = current / 2
    elif current is None:  # an optional number left unset (e.g. tokens_per_minute)
        value = 1000
    else:
        value = current + 1
    new = copy.deepcopy(BASE)
    target = new
    *parents, leaf = path.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value
    changes = configdiff.diff(old_cfg, config.parse(yaml.safe_dump(new)))
    if path.startswith("rate_limits.default."):
        # A program limit that leaves the number unset inherits the change, and shows it.
        inherited = [c for c in changes if c.path.startswith("rate_limits.programs.")]
        assert all(c.path.endswith("." + leaf) for c in inherited)
        changes = [c for c in changes if c not in inherited]
    restart = path in config.RESTART_ONLY or path.rpartition(".")[0] in config.RESTART_ONLY
    shown = path if not restart or path in config.RESTART_ONLY else path.rpartition(".")[0]
    assert [(c.path, c.restart_required) for c in changes] == [(shown, restart)]


def test_restart_only_is_what_the_declarations_say() -> None:
    assert set(config.RESTART_ONLY) == {
        "listen",
        "admin.listen",
        "redis.url",
        "keys.pepper_env",
        "keys.pepper_file",
        "cache.max_entries",
        "state_dir",
        "rate_limits.lease_requests",
        "rate_limits.lease_ms",
    }


def test_a_reload_keeps_every_restart_only_setting() -> None:
    running = config.load(SHIPPED)
    new = copy.deepcopy(BASE)
    new["listen"] = {"host": "127.0.0.2", "port": 1}
    new["admin"]["listen"] = {"host": "127.0.0.3", "port": 2}
    new["redis"]["url"] = "redis://10.0.0.1:6379/0"
    new["keys"] = {"pepper_env": "OTHER_PEPPER", "pepper_file": "/run/pepper"}
    new["cache"]["max_entries"] = 7
    new["state_dir"] = "/elsewhere"
    new.setdefault("rate_limits", {}).update(lease_requests=0, lease_ms=100)
    new["cache"]["ttl_seconds"] = 1
    new_cfg = config.parse(yaml.safe_dump(new))
    kept = config.keep_restart_only(running, new_cfg)
    assert configdiff.diff(running, kept) == [Change("cache", "cache.ttl_seconds", "5", "1", False)]
    assert len([c for c in configdiff.diff(running, new_cfg) if c.restart_required]) == len(
        config.RESTART_ONLY
    )
