"""The parsers that read what a client or an upstream sent: the API key's id (``key_id_of``) and
the upstream's safety-flag header (``parse_flag_header``). Any input gets an answer or None, never
an exception, and nothing malformed gets through."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import identity
from proxy.dataplane.flags import MAX_SEVERITY, parse_flag_header
from proxy.identity import KEY_PREFIX, key_id_of, new_key
from proxy.policy.standing import Flag

NOW = 1_750_000_000.0

# --------------------------------------------------------------------------- key_id_of


def test_an_issued_key_names_its_id() -> None:
    for _ in range(50):
        key_id, key = new_key()
        assert key_id_of(key) == key_id


@pytest.mark.parametrize(
    "mangle",
    [
        lambda k: k.replace(KEY_PREFIX, "sk-xx-", 1),
        lambda k: k[: len(KEY_PREFIX) + 12] + "_" + k[len(KEY_PREFIX) + 13 :],
        lambda k: k[: len(KEY_PREFIX) + 12 + 32],  # a secret shorter than 32 characters
        lambda k: KEY_PREFIX + "0x" + k[len(KEY_PREFIX) + 2 :],
        lambda k: KEY_PREFIX + "A" + k[len(KEY_PREFIX) + 1 :].upper(),  # an upper-case hex digit
        lambda k: KEY_PREFIX + "+" + k[len(KEY_PREFIX) + 1 :],
        lambda k: KEY_PREFIX + "12_4" + k[len(KEY_PREFIX) + 4 :],
        lambda k: KEY_PREFIX + " " + k[len(KEY_PREFIX) + 1 :],
        lambda k: " " + k,
        lambda k: "",
    ],
)
def test_a_malformed_key_has_no_id(mangle: object) -> None:
    _, key = new_key()
    mangled = mangle(key)  # type: ignore[operator]
    assert key_id_of(mangled) is None, mangled


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(max_size=80),
        st.text(max_size=60).map(lambda t: KEY_PREFIX + t),
        st.from_regex(r"sk-ap-[0-9a-fA-Fx_+\- ]{12}-.{0,40}", fullmatch=True),
    )
)
def test_key_id_of_any_text_is_none_or_the_hex_id_in_place(text: str) -> None:
    key_id = key_id_of(text)
    if key_id is not None:
        assert re.fullmatch(r"[0-9a-f]{12}", key_id)
        assert text.startswith(KEY_PREFIX + key_id + "-")
        assert len(text) >= len(KEY_PREFIX) + 12 + 33


def test_identity_module_issues_keys_in_the_documented_shape() -> None:
    key_id, key = new_key()
    assert re.fullmatch(r"sk-ap-[0-9a-f]{12}-[A-Za-z0-9_-]{43}", key)
    assert identity.key_id_of(key) == key_id


# --------------------------------------------------------------------------- parse_flag_header


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("cyber", ("cyber", 1)),
        ("Cyber;severity=3", ("cyber", 3)),
        ("  bio ; Severity = 2 ", ("bio", 2)),
        ("spam;note=x;severity=4", ("spam", 4)),
        ("spam;other=1", ("spam", 1)),
        (f"x;severity={MAX_SEVERITY}", ("x", MAX_SEVERITY)),
        ("c" * 64, ("c" * 64, 1)),
        ("", None),
        (";severity=2", None),
        ("   ", None),
        ("c" * 65, None),
        ("cyber;severity=0", None),
        ("cyber;severity=-1", None),
        (f"cyber;severity={MAX_SEVERITY + 1}", None),
        ("cyber;severity=", None),
        ("cyber;severity=two", None),
        ("cyber;severity=1.5", None),
    ],
)
def test_flag_header_examples(value: str, expected: tuple[str, int] | None) -> None:
    flag = parse_flag_header(value, NOW)
    if expected is None:
        assert flag is None
    else:
        assert flag == Flag(at=NOW, category=expected[0], severity=expected[1], source="upstream")


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=120), st.from_regex(r"[a-z ]{0,8};\s*severity\s*=.{0,6}")))
def test_any_flag_header_is_a_bounded_flag_or_none(value: str) -> None:
    flag = parse_flag_header(value, NOW)
    if flag is not None:
        assert 1 <= flag.severity <= MAX_SEVERITY
        assert flag.category and len(flag.category) <= 64 and ";" not in flag.category
        assert flag.category == flag.category.strip().lower()
        assert (flag.at, flag.source) == (NOW, "upstream")


@settings(max_examples=200, deadline=None)
@given(
    st.text(
        alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_", min_size=1, max_size=64
    ),
    st.integers(1, MAX_SEVERITY),
)
def test_a_well_formed_flag_header_reads_back(category: str, severity: int) -> None:
    flag = parse_flag_header(f"{category};severity={severity}", NOW)
    assert flag == Flag(at=NOW, category=category.lower(), severity=severity, source="upstream")
