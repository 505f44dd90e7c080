"""The config schema (SPEC §8): the shipped file loads, defaults fill the optional keys, and every
broken file is rejected with each of its problems located by key path and line."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import config
from proxy.config import ConfigError, ConfigIssue
from proxy.snapshot import Snapshot

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = Path(__file__).resolve().parent / "configs"


def issues_of(name: str) -> list[tuple[str, int | None]]:
    with pytest.raises(ConfigError) as caught:
        config.load(CONFIGS / name)
    return [(i.path, i.line) for i in caught.value.issues]


def only_issue(name: str) -> ConfigIssue:
    with pytest.raises(ConfigError) as caught:
        config.load(CONFIGS / name)
    assert len(caught.value.issues) == 1, caught.value.issues
    return caught.value.issues[0]


# --------------------------------------------------------------------------- valid files


def test_shipped_config_loads() -> None:
    cfg = config.load(ROOT / "config" / "proxy.yaml")
    assert cfg.listen == config.Listen("0.0.0.0", 8080)
    assert cfg.admin.listen == config.Listen("127.0.0.1", 9090)
    assert [t.name for t in cfg.admin.tokens] == [
        "ops",
        "provider-review",
        "gov-review",
        "dashboards",
    ]
    assert cfg.admin.tokens_by_hash["0" * 63 + "3"].roles == ("viewer",)
    assert set(cfg.programs) == {"gpt-5.6-preview", "gpt-5.5-alpha"}
    preview = cfg.programs["gpt-5.6-preview"]
    assert preview.required_approvals == ("provider", "government")
    assert dict(preview.phases) == {"api": "preview", "codex": "preview", "chatgpt": "closed"}
    assert cfg.program_of_model["gpt-5.6-luna"] == "gpt-5.6-preview"
    assert cfg.program_of_model["gpt-5.5-alpha"] == "gpt-5.5-alpha"
    assert cfg.rate_limits.for_program("gpt-5.6-preview").requests_per_minute == 120
    assert cfg.rate_limits.for_program("gpt-5.5-alpha") == cfg.rate_limits.default
    assert [t.name for t in cfg.misuse.tiers] == ["watch", "restricted", "cooldown", "suspended"]
    assert cfg.pricing.models["gpt-5.6-sol"].output == 60.0
    # Longest prefix wins whatever the order in the file.
    route = cfg.route_for("/codex/v1/responses", None)
    assert route is not None and route.product == "codex" and route.rewrite_prefix == "/v1/"
    assert cfg.route_for("/nowhere", None) is None


def test_a_host_route_wins_for_its_host_only() -> None:
    cfg = config.parse(
        """
upstreams: {models: {url: "http://127.0.0.1:1"}, eu: {url: "http://127.0.0.1:2"}}
routes:
  - {path_prefix: /v1/, product: api, upstream: models}
  - {path_prefix: /v1/, product: api, upstream: eu, host: eu.example.com}
programs: {}
"""
    )
    eu = cfg.route_for("/v1/chat/completions", "eu.example.com")
    assert eu is not None and eu.upstream == "eu"
    other = cfg.route_for("/v1/chat/completions", "us.example.com")
    assert other is not None and other.upstream == "models"
    assert cfg.route_for("/v1/chat/completions", None) == other
    # The handler reads the Host header only when some route needs it.
    assert Snapshot.of(cfg).host_routes
    assert not Snapshot.of(config.load(ROOT / "config" / "proxy.yaml")).host_routes


def test_load_uses_the_environment_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCESS_PROXY_CONFIG", str(CONFIGS / "minimal.yaml"))
    assert config.load().source == str(CONFIGS / "minimal.yaml")


def test_defaults_fill_every_optional_key() -> None:
    cfg = config.load(CONFIGS / "minimal.yaml")
    assert cfg.listen == config.Listen("0.0.0.0", 8080)
    assert cfg.admin.listen == config.Listen("127.0.0.1", 9090)
    assert cfg.admin.tokens == ()
    assert cfg.redis == config.RedisConfig("embedded", 50, 3, 1.0)
    assert cfg.keys == config.KeysConfig("ACCESS_PROXY_PEPPER", None)
    assert cfg.products == ("api", "codex", "chatgpt")
    assert cfg.upstreams["models"].timeouts == config.Timeouts(5.0, 120.0, 60.0)
    assert cfg.upstreams["models"].api_key_env is None
    program = cfg.programs["gpt-5.6-preview"]
    assert program.required_approvals == ("provider",)
    assert dict(program.phases) == {"api": "preview", "codex": "closed", "chatgpt": "closed"}
    assert program.blocked_categories == ()
    assert cfg.unlisted_models == "allow"
    assert cfg.trusted_proxies == ()
    assert cfg.limits.max_body_bytes == 10 * 1024 * 1024
    assert cfg.cache == config.CacheConfig(5.0, 300.0, 100_000)
    assert cfg.misuse.window_seconds == 604800
    assert cfg.misuse.upstream_flag_header == "x-safety-flag"
    assert cfg.misuse.classifier == config.ClassifierConfig(None, 100, "closed")
    tiers = {t.name: t for t in cfg.misuse.tiers}
    assert [t.min_score for t in cfg.misuse.tiers] == [1, 3, 5, 8]
    assert tiers["restricted"].rate_limit_factor == 0.2
    assert tiers["restricted"].blocked_categories == ("cyber",)
    assert tiers["cooldown"].block_seconds == 900
    assert tiers["suspended"].suspend and not tiers["watch"].suspend
    assert cfg.rate_limits.default == config.RateLimit(600, 60, 50, False, None)
    assert dict(cfg.rate_limits.programs) == {}
    assert cfg.usage.retention_days == 400
    assert cfg.pricing.cache_write_multiplier == 1.25
    assert cfg.pricing.cached_input_discount == 0.9
    assert cfg.state_dir == ".state"
    assert cfg.shutdown_grace_s == 30.0


def test_snapshot_is_immutable() -> None:
    cfg = config.load(CONFIGS / "minimal.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.unlisted_models = "deny"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.programs["other"] = cfg.programs["gpt-5.6-preview"]  # type: ignore[index]


def test_program_rate_limit_inherits_unset_fields_from_default() -> None:
    text = (CONFIGS / "minimal.yaml").read_text() + (
        "rate_limits:\n"
        "  default: {requests_per_minute: 100, burst: 7, concurrent: 3}\n"
        "  programs: {gpt-5.6-preview: {requests_per_minute: 10}}\n"
    )
    cfg = config.parse(text)
    assert cfg.rate_limits.for_program("gpt-5.6-preview") == config.RateLimit(10, 7, 3, False, None)
    assert cfg.rate_limits.for_program(None).requests_per_minute == 100


def test_token_limits_and_usage_retention() -> None:
    text = (CONFIGS / "minimal.yaml").read_text() + (
        "rate_limits:\n"
        "  default: {tokens_per_minute: 5000}\n"
        "  programs: {gpt-5.6-preview: {requests_per_minute: 10}}\n"
        "usage: {retention_days: 30}\n"
    )
    cfg = config.parse(text)
    assert cfg.rate_limits.for_program("gpt-5.6-preview").tokens_per_minute == 5000  # inherited
    assert cfg.usage.retention_days == 30
    for bad in ("tokens_per_minute: 0", "tokens_per_minute: -3", "tokens_per_minute: lots"):
        broken = (CONFIGS / "minimal.yaml").read_text() + f"rate_limits:\n  default: {{{bad}}}\n"
        with pytest.raises(config.ConfigError) as err:
            config.parse(broken)
        assert [i.path for i in err.value.issues] == ["rate_limits.default.tokens_per_minute"]
    with pytest.raises(config.ConfigError) as err:
        config.parse((CONFIGS / "minimal.yaml").read_text() + "usage: {retention_days: 0}\n")
    assert [i.path for i in err.value.issues] == ["usage.retention_days"]


def test_trusted_proxies_accept_addresses_and_networks() -> None:
    text = (CONFIGS / "minimal.yaml").read_text() + "trusted_proxies: [10.0.0.0/8, '::1']\n"
    cfg = config.parse(text)
    assert cfg.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )


# --------------------------------------------------------------------------- broken files


@pytest.mark.parametrize(
    ("name", "path", "line", "message"),
    [
        ("unknown_top_key.yaml", "rate_limit", 8, "unknown key 'rate_limit'"),
        (
            "unknown_nested_key.yaml",
            "upstreams.models.timeout",
            5,
            "unknown key 'timeout' (allowed: url, api_key_env, timeouts)",
        ),
        ("port_as_string.yaml", "listen.port", 4, "must be int, got a string"),
        ("list_for_mapping.yaml", "cache", 8, "must be a mapping, got a list"),
        (
            "undefined_upstream.yaml",
            "routes[1].upstream",
            8,
            "route to undefined upstream 'codex-models'",
        ),
        ("unknown_product.yaml", "routes[0].product", 6, "unknown product 'assistants'"),
        (
            "model_listed_twice.yaml",
            "programs.gpt-5.6-preview.models[2]",
            11,
            "model 'gpt-5.6-sol' listed twice",
        ),
        (
            "model_in_two_programs.yaml",
            "programs.gpt-5.5-alpha.models[1]",
            10,
            "model 'gpt-5.6-terra' already belongs to program 'gpt-5.6-preview'",
        ),
        (
            "unknown_approval_role.yaml",
            "programs.gpt-5.6-preview.required_approvals[1]",
            14,
            "unknown approval role 'legal'",
        ),
        (
            "duplicate_token_names.yaml",
            "admin.tokens[1].name",
            5,
            "duplicate admin token name 'ops'",
        ),
        ("bad_token_hash.yaml", "admin.tokens[0].sha256", 5, "must be 64 lowercase hex"),
        (
            "invalid_phase.yaml",
            "programs.gpt-5.6-preview.phases.codex",
            11,
            "phase must be one of closed, preview, ga",
        ),
        ("bad_url.yaml", "upstreams.models.url", 4, "must be an http:// or https:// URL"),
        (
            "yaml_syntax_error.yaml",
            "",
            4,
            "YAML syntax error: while parsing a flow mapping (line 3)",
        ),
        ("missing_programs.yaml", "programs", None, "is required"),
        (
            "tiers_share_min_score.yaml",
            "misuse.tiers[2].min_score",
            12,
            "tiers 'restricted' and 'cooldown' share min_score 3",
        ),
        ("duplicate_key.yaml", "unlisted_models", 9, "duplicate key"),
        (
            "duplicate_route.yaml",
            "routes[1].path_prefix",
            6,
            "duplicate route for path_prefix '/v1/'",
        ),
    ],
)
def test_broken_file_reports_its_located_issue(
    name: str, path: str, line: int | None, message: str
) -> None:
    issue = only_issue(name)
    assert (issue.path, issue.line) == (path, line)
    assert message in issue.message


def test_every_problem_in_one_file_is_reported() -> None:
    assert issues_of("several_problems.yaml") == [
        ("listen.port", 2),
        ("upstreams.models.url", 5),
        ("routes[0].path_prefix", 7),
        ("programs.gpt-5.6-preview.phases.assistants", 11),
        ("programs.gpt-5.6-preview.phases.api", 11),
        ("unlisted_models", 12),
        ("trusted_proxies[1]", 13),
        ("rate_limits.programs.gpt-9", 16),
        ("rate_limits.programs.gpt-9.requests_per_minute", 16),
    ]


def test_error_text_is_one_located_issue_per_line() -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(CONFIGS / "several_problems.yaml")
    lines = str(caught.value).splitlines()
    source = str(CONFIGS / "several_problems.yaml")
    assert len(lines) == len(caught.value.issues) == 9
    assert lines[0] == f"{source}:2: listen.port: must be a port number 0..65535"
    assert lines[6] == (
        f"{source}:13: trusted_proxies[1]: not an IP address or CIDR network: 'not-a-network'"
    )
    assert caught.value.as_list()[5] == {
        "path": "unlisted_models",
        "line": 12,
        "message": "must be allow or deny",
    }


def test_yaml_syntax_error_is_a_single_line() -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(CONFIGS / "yaml_syntax_error.yaml")
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"{CONFIGS / 'yaml_syntax_error.yaml'}:4: <root>: YAML syntax error")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as caught:
        config.load(missing)
    assert caught.value.issues == [ConfigIssue("", "cannot read file: No such file or directory")]
    assert str(caught.value) == f"{missing}: <root>: cannot read file: No such file or directory"


def test_every_required_section_is_reported_for_an_empty_file() -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse("", "empty.yaml")
    assert [(i.path, i.message) for i in caught.value.issues] == [
        ("upstreams", "is required"),
        ("routes", "is required"),
        ("programs", "is required"),
    ]


@pytest.mark.parametrize(
    ("text", "path", "line", "message"),
    [
        ("a: &x [*x]\n", "a[0]", 1, "recursive YAML alias"),
        ("? [1]\n: 2\n", "", 1, "a mapping key must be a plain scalar"),
        ("b: &b {url: x}\nc: {<<: *b}\n", "c", 2, "merge keys (<<) are not supported"),
        ("x: !!python/object:os.system a\n", "x", 1, "unsupported YAML"),
        ("a:\n\tb: 1\n", "", 2, "YAML syntax error"),
        ("[" * 5000, "", None, "YAML nesting is too deep"),
    ],
)
def test_yaml_the_schema_cannot_hold_is_a_config_error(
    text: str, path: str, line: int | None, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse(text, "odd.yaml")
    first = caught.value.issues[0]
    assert (first.path, first.line) == (path, line)
    assert message in first.message


def test_unknown_role_and_bad_classifier_url_are_located() -> None:
    text = (CONFIGS / "minimal.yaml").read_text() + (
        "admin:\n"
        "  tokens:\n"
        f"    - {{name: ops, sha256: '{'a' * 64}', roles: [superuser]}}\n"
        "misuse:\n"
        "  classifier: {url: 'http://[::1'}\n"
    )
    with pytest.raises(ConfigError) as caught:
        config.parse(text, "f.yaml")
    assert [(i.path, i.line) for i in caught.value.issues] == [
        ("admin.tokens[0].roles[0]", 13),
        ("misuse.classifier.url", 15),
    ]


# --------------------------------------------------------------------------- the check command


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.configdiff", "check", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_command_accepts_a_valid_file() -> None:
    done = run_check("config/proxy.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("config/proxy.yaml: ok, version ")
    assert "3 routes, 1 upstreams, 2 programs" in done.stdout
    assert len(done.stdout.splitlines()) == 1


def test_check_command_defaults_to_the_shipped_path() -> None:
    env = {k: v for k, v in os.environ.items() if k != "ACCESS_PROXY_CONFIG"}
    done = subprocess.run(
        [sys.executable, "-m", "proxy.configdiff", "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"{config.DEFAULT_PATH}: ok, version ")


def test_check_command_prints_every_error_and_fails() -> None:
    target = str(CONFIGS / "several_problems.yaml")
    done = run_check(target)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert len(lines) == 9
    assert all(line.startswith(f"{target}:") for line in lines)
    assert f"{target}:16: rate_limits.programs.gpt-9: unknown program 'gpt-9'" in lines


def test_check_command_reports_a_missing_file(tmp_path: Path) -> None:
    done = run_check(str(tmp_path / "absent.yaml"))
    assert done.returncode == 1
    assert "cannot read file" in done.stdout


# --------------------------------------------------------------------------- properties

_KEYS = st.sampled_from(
    [*config._TOP, "url", "port", "host", "models", "phases", "tiers", "name", "min_score", "api"]
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["http://x", "/v1/", "preview", "ga", "api", "embedded", "10.0.0.0/8"]),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(_KEYS, st.text(max_size=6), st.integers()), inner, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_KEYS, _VALUES, max_size=8))
def test_parse_raises_only_config_error(data: dict[str, Any]) -> None:
    text = yaml.safe_dump(data)
    try:
        cfg = config.parse(text, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.issues
        for issue in exc.issues:
            assert isinstance(issue.path, str) and issue.message
            assert "\n" not in issue.format("fuzz.yaml")
    else:
        assert cfg.source == "fuzz.yaml"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("{}[]:,-&*!?|>'\"#% \n\tab1")), max_size=40))
def test_parse_of_arbitrary_text_raises_only_config_error(text: str) -> None:
    try:
        config.parse(text, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.issues


@settings(max_examples=50, deadline=None)
@given(
    st.sampled_from(["listen.port", "cache.ttl_seconds", "limits.max_body_bytes"]),
    st.one_of(st.text(max_size=5), st.lists(st.integers(), max_size=2), st.booleans()),
)
def test_wrong_type_is_located_at_its_key(key: str, value: Any) -> None:
    section, field = key.split(".")
    text = (CONFIGS / "minimal.yaml").read_text() + yaml.safe_dump({section: {field: value}})
    with pytest.raises(ConfigError) as caught:
        config.parse(text, "f.yaml")
    assert [(i.path, i.line) for i in caught.value.issues] == [(key, 12)]


def test_redis_url_from_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config.load(CONFIGS / "minimal.yaml")
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert config.redis_url(cfg) == "embedded"
    monkeypatch.setenv("REDIS_URL", "redis://10.1.2.3:6379/0")
    assert config.redis_url(cfg) == "redis://10.1.2.3:6379/0"
    assert cfg.redis.url == "embedded"  # the snapshot itself says what the file says


def test_a_setting_of_an_unreadable_type_is_refused_at_declaration() -> None:
    @dataclasses.dataclass(frozen=True)
    class Odd:
        when: complex = config.setting(1j)

    with pytest.raises(TypeError, match="no reader"):
        config.declared(Odd)
