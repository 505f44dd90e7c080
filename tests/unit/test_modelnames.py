"""Model names as operators and upstreams spell them (SPEC §3.3): exact names, globs, dated
snapshots, ft: fine-tunes, case and whitespace; a name that would fall in two programs is a
located config error; the policy, grant subsets and explain share the one matcher."""

from __future__ import annotations

import fnmatch
import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import config
from proxy.config import ConfigError
from proxy.modelnames import ModelMatcher, covered_by, glob_tokens, globs_intersect, normalize

PROGRAMS = [("gpt-5.6-sol", "preview"), ("gpt-5.6-terra", "preview"), ("o9-*", "o9")]
MATCHER = ModelMatcher(PROGRAMS)
SETTINGS = settings(max_examples=200, deadline=None)

BASE = """
upstreams:
  models: {url: http://127.0.0.1:8089}
routes:
  - {path_prefix: /v1/, product: api, upstream: models}
programs:
"""

spaces = st.text(" \t\n\u00a0\u3000", max_size=3)
dates = st.dates().map(lambda d: d.isoformat())


def spellings(name: str) -> st.SearchStrategy[str]:
    """The name as a client may spell it: any case, padded with whitespace."""
    cased = st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda flips: "".join(c.upper() if f else c for c, f in zip(name, flips, strict=True))
    )
    return st.tuples(spaces, cased, spaces).map("".join)


@settings(max_examples=50, deadline=None)
@given(data=st.data(), entry=st.sampled_from(["gpt-5.6-sol", "gpt-5.6-terra"]), date=dates)
def test_snapshots_fine_tunes_case_and_whitespace_stay_in_the_program(
    data: st.DataObject, entry: str, date: str
) -> None:
    forms = [
        entry,
        f"{entry}-{date}",
        f"ft:{entry}:acme::abc123",
        f"ft:{entry}-{date}:acme:custom:id9",
    ]
    for form in forms:
        spelled = data.draw(spellings(form))
        assert MATCHER.owner_of(spelled) == "preview", spelled


@pytest.mark.parametrize(
    "name",
    ["gpt-5.6-solar", "gpt-5.6", "gpt-5.6-sol-2026-6-24", "xgpt-5.6-sol", "ft:gpt-5.6-solx:a", ""],
)
def test_other_names_do_not_belong(name: str) -> None:
    assert MATCHER.owner_of(name) is None


def test_globs_and_their_snapshots_and_fine_tunes() -> None:
    for name in ("o9-mini", "O9-MINI", "o9-mini-2026-01-02", "ft:o9-mini:org::x", " o9- "):
        assert MATCHER.owner_of(name) == "o9", name
    assert MATCHER.owner_of("o9") is None


def test_unicode_compatibility_forms_are_the_same_name() -> None:
    assert MATCHER.owner_of("ｇｐｔ-5.6-sol") == "preview"  # fullwidth
    assert MATCHER.owner_of("gpt-5.6-ſol") == "preview"  # long s case-folds to s
    assert normalize(" GPT-5.6-Sol\u00a0") == "gpt-5.6-sol"


def test_grant_subsets_use_the_same_rules() -> None:
    assert covered_by(("gpt-5.6-sol",), "GPT-5.6-sol-2026-06-24")
    assert covered_by(("gpt-5.6-sol",), "ft:gpt-5.6-sol:org::1")
    assert not covered_by(("gpt-5.6-sol",), "gpt-5.6-terra")


# --------------------------------------------------------------------------- glob overlap

small_globs = st.lists(
    st.sampled_from(["a", "b", "-", "*", "?", "[ab]", "[!a]", "[a-b]"]), max_size=3
).map("".join)


@settings(max_examples=200, deadline=None)
@given(a=small_globs, b=small_globs)
def test_glob_overlap_agrees_with_brute_force(a: str, b: str) -> None:
    # Over the alphabet {a, b, -, c}, a shortest common string is no longer than both globs.
    bound = len(glob_tokens(a)) + len(glob_tokens(b)) + 1
    ra, rb = re.compile(fnmatch.translate(a)), re.compile(fnmatch.translate(b))
    brute = any(
        ra.match(s) and rb.match(s)
        for n in range(bound + 1)
        for s in map("".join, itertools.product("ab-c", repeat=n))
    )
    assert globs_intersect(glob_tokens(a), glob_tokens(b)) == brute, (a, b)


# --------------------------------------------------------------------------- config check


def issues(programs: str) -> list[tuple[str, int | None, str]]:
    with pytest.raises(ConfigError) as caught:
        config.parse(BASE + programs, "c.yaml")
    return [(i.path, i.line, i.message) for i in caught.value.issues]


@pytest.mark.parametrize(
    "second,example",
    [
        ("GPT-5.6-SOL", None),
        ("gpt-5.6-sol-2026-01-01", "gpt-5.6-sol-2026-01-01"),
        ("ft:*", "ft:gpt-5.6-sol:"),
        ("gpt-5.6-*", "gpt-5.6-sol"),
        ("'[g]pt-5.6-so?'", "gpt-5.6-sol"),
    ],
)
def test_config_check_rejects_a_name_in_two_programs(second: str, example: str | None) -> None:
    found = issues(f"  a:\n    models: [gpt-5.6-sol]\n  b:\n    models: [x, {second}]\n")
    assert len(found) == 1, found
    path, line, message = found[0]
    assert (path, line) == ("programs.b.models[1]", 10)
    assert "program 'a'" in message
    if example is not None:
        assert repr(example) in message


def test_config_keeps_disjoint_programs_and_glob_overlap_within_one() -> None:
    cfg = config.parse(
        BASE + "  a:\n    models: [gpt-5.6-sol, 'gpt-5.6-*']\n  b:\n    models: ['gpt-5.7-*', o1]\n"
    )
    assert cfg.program_of(" GPT-5.6-SOL-2026-01-01") == "a"
    assert cfg.program_of("ft:gpt-5.7-x:org::1") == "b"
    assert cfg.program_of("gpt-5.8") is None


# --------------------------------------------------------------------------- one matcher everywhere


def test_decide_subsets_explain_and_batches_share_the_matcher() -> None:
    from proxy.admin.explain import explain_facts
    from proxy.policy import RequestInfo, decide, decide_models
    from tests.unit.test_policy import ALLOW_UNLISTED, NOW, make_facts, make_grant

    cfg = ALLOW_UNLISTED
    snapshot = " GPT-5.6-Sol-2026-06-24"
    nobody = make_facts()
    assert decide(nobody, cfg, RequestInfo("api", snapshot), NOW).code == "model_not_found"
    granted = make_facts((make_grant(models=("gpt-5.6-sol",)),))
    assert decide(granted, cfg, RequestInfo("api", snapshot), NOW).allowed
    assert decide(granted, cfg, RequestInfo("api", "ft:gpt-5.6-sol:a::1"), NOW).allowed
    assert decide(granted, cfg, RequestInfo("api", "gpt-5.6-terra"), NOW).code == "model_not_found"
    answer = explain_facts(cfg, nobody, RequestInfo("api", snapshot), NOW, {})
    assert answer["facts"]["program"] == "gpt-5.6-preview" and answer["code"] == "model_not_found"
    # A batch naming an allowed model and a preview snapshot is refused as a whole.
    batch = decide_models(nobody, cfg, "api", ("gpt-4o", snapshot), NOW)
    assert batch.code == "model_not_found"
    assert decide_models(granted, cfg, "api", ("gpt-4o", snapshot), NOW).allowed
