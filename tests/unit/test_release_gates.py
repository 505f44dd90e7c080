"""Release gates (SPEC §4): a program's ``release_gates.ga_not_before`` makes a config that puts
any product of it in ``ga`` earlier invalid; from that time on the flip is accepted. The clock is
passed in, so both sides of the gate are tested without waiting for a date."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import config, configdiff

GATE = "2026-07-24T00:00:00Z"
GATE_T = datetime(2026, 7, 24, tzinfo=UTC).timestamp()


def text(phases: str = "{api: ga, codex: preview, chatgpt: closed}", gate: str = GATE) -> str:
    return f"""
upstreams:
  models: {{url: "http://127.0.0.1:9"}}
routes:
  - {{path_prefix: /v1/, product: api, upstream: models}}
programs:
  gpt-5.6-preview:
    models: [gpt-5.6-sol]
    phases: {phases}
    eligibility: {{requires_account_representative: true}}
    release_gates: {{ga_not_before: {gate}}}
  gpt-5.5-alpha:
    models: [gpt-5.5-alpha]
    phases: {{api: ga}}
"""


def test_ga_before_the_gate_is_a_located_error_naming_when_it_opens() -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.parse(text(), "gates.yaml", now=GATE_T - 1)
    (issue,) = caught.value.issues
    assert issue.path == "programs.gpt-5.6-preview.phases.api"
    assert issue.line == 9
    assert "2026-07-24T00:00:00Z" in issue.message
    assert "release_gates.ga_not_before" in issue.message
    assert str(caught.value).startswith("gates.yaml:9: programs.gpt-5.6-preview.phases.api: ")


def test_ga_from_the_gate_on_is_accepted() -> None:
    for now in (GATE_T, GATE_T + 1, GATE_T + 86400 * 365):
        cfg = config.parse(text(), now=now)
        program = cfg.programs["gpt-5.6-preview"]
        assert program.phases["api"] == "ga"
        assert program.release_gates.ga_not_before_t == GATE_T
        assert program.eligibility.requires_account_representative


def test_every_product_in_ga_is_named_and_other_programs_are_not_gated() -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.parse(text("{api: ga, codex: ga, chatgpt: preview}"), now=GATE_T - 86400)
    assert {i.path for i in caught.value.issues} == {
        "programs.gpt-5.6-preview.phases.api",
        "programs.gpt-5.6-preview.phases.codex",
    }


@pytest.mark.parametrize(
    "gate",
    ['"2026-07-24"', '"2026-07-24T00:00:00"', '"soon"', "12", '"2026-13-01T00:00:00Z"'],
)
def test_a_gate_that_is_not_an_rfc3339_time_with_offset_is_located(gate: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.parse(text("{api: preview}", gate), now=0)
    (issue,) = caught.value.issues
    assert issue.path == "programs.gpt-5.6-preview.release_gates.ga_not_before"
    assert issue.line == 11


def test_offsets_and_unquoted_yaml_timestamps_are_the_same_instant() -> None:
    for gate in ('"2026-07-24T02:00:00+02:00"', "2026-07-24T00:00:00Z", '"2026-07-24t00:00:00z"'):
        cfg = config.parse(text("{api: preview}", gate), now=0)
        assert cfg.programs["gpt-5.6-preview"].release_gates.ga_not_before_t == GATE_T, gate


_PHASE = st.sampled_from(("closed", "preview", "ga"))


@settings(max_examples=200, deadline=None)
@given(
    phases=st.tuples(_PHASE, _PHASE, _PHASE),
    gate_offset=st.integers(-(10**9), 10**9),
    now=st.integers(0, 4 * 10**9),
)
def test_a_config_is_valid_exactly_when_no_product_is_ga_before_the_gate(
    phases: tuple[str, str, str], gate_offset: int, now: int
) -> None:
    gate_t = max(0, now + gate_offset)
    gate = datetime.fromtimestamp(gate_t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    api, codex, chatgpt = phases
    source = text(f"{{api: {api}, codex: {codex}, chatgpt: {chatgpt}}}", f'"{gate}"')
    should_fail = "ga" in phases and now < gate_t
    try:
        config.parse(source, now=now)
    except config.ConfigError as exc:
        assert should_fail, exc
        expected = {
            f"programs.gpt-5.6-preview.phases.{product}"
            for product, phase in zip(("api", "codex", "chatgpt"), phases, strict=True)
            if phase == "ga"
        }
        assert {i.path for i in exc.issues} == expected
    else:
        assert not should_fail


def test_config_check_refuses_a_future_gate_and_accepts_a_past_one(tmp_path: Path) -> None:
    future, past = tmp_path / "future.yaml", tmp_path / "past.yaml"
    future.write_text(text(gate='"2999-01-01T00:00:00Z"'))
    past.write_text(text(gate='"2001-01-01T00:00:00Z"'))
    command = [sys.executable, "-m", "proxy.cli", "config", "check"]
    refused = subprocess.run([*command, str(future)], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1, refused
    assert f"{future}:9: programs.gpt-5.6-preview.phases.api: ga is not allowed before" in (
        refused.stdout
    )
    assert "2999-01-01T00:00:00Z" in refused.stdout
    accepted = subprocess.run([*command, str(past)], capture_output=True, text=True, timeout=60)
    assert accepted.returncode == 0, accepted


def test_the_diff_shows_gate_and_eligibility_changes() -> None:
    old = config.parse(text("{api: preview}"), now=0)
    new_text = text("{api: ga}", '"2026-01-01T00:00:00Z"').replace(
        "requires_account_representative: true", "requires_account_representative: false"
    )
    new = config.parse(new_text, now=GATE_T)
    lines = configdiff.format_changes(configdiff.diff(old, new))
    assert (
        "programs.gpt-5.6-preview.release_gates.ga_not_before: 2026-07-24T00:00:00Z -> "
        "2026-01-01T00:00:00Z" in lines
    ), lines
    assert (
        "programs.gpt-5.6-preview.eligibility.requires_account_representative: true -> false"
        in lines
    ), lines
    assert "programs.gpt-5.6-preview.phases.api: preview -> ga" in lines, lines
