"""deploy/grafana and deploy/prometheus (SPEC §12), checked without Prometheus: the dashboard
covers every SPEC §9 metric and names no other (beyond the README's documented extras), each
query's labels belong to the metrics it reads, the layout is one Grafana can import, and the
alert rules cover what SPEC §12 lists, each with a promtool case. ``make deploy-check`` runs the
promtool side; tests/e2e/test_deploy_metrics_e2e.py compares the names with a running proxy."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from proxy import metrics
from proxy.errors import CODES
from tests.deploy_refs import (
    KNOWN,
    RULE_TESTS,
    SPEC_9,
    TARGET_LABELS,
    Query,
    alert_rules,
    dashboard,
    dashboard_queries,
    rule_queries,
)


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in doc["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


def test_dashboard_shows_every_spec_9_metric() -> None:
    shown = {f for q in dashboard_queries() for f in q.families()}
    assert set(SPEC_9) - shown == set()


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_queries_name_only_known_metrics_and_their_labels(source: str) -> None:
    queries: list[Query] = dashboard_queries() if source == "dashboard" else rule_queries()
    assert queries
    for q in queries:
        unknown = q.families() - set(KNOWN)
        assert not unknown, f"{q.where}: unknown metric {unknown}"
        for family, label in q.matcher_labels():
            allowed = KNOWN[family].labels | TARGET_LABELS
            if KNOWN[family].kind == "histogram":
                allowed |= {"le"}
            assert label in allowed, f"{q.where}: {family} has no label {label!r}"
        readable = set(TARGET_LABELS)
        for family in q.families():
            readable |= KNOWN[family].labels | (
                {"le"} if KNOWN[family].kind == "histogram" else set()
            )
        if "up{" in q.expr:
            readable |= TARGET_LABELS
        assert q.grouping_labels() <= readable, f"{q.where}: grouped by {q.grouping_labels()}"


def test_quantiles_read_histogram_buckets_and_rates_read_counters() -> None:
    for q in dashboard_queries() + rule_queries():
        for name in re.findall(r"histogram_quantile\([^,]+,[^)]*?\b(access_proxy_\w+)", q.expr):
            assert name.endswith("_bucket"), f"{q.where}: quantile of {name}"
        for fn, name in re.findall(r"\b(rate|increase)\((access_proxy_\w+)", q.expr):
            family = KNOWN.get(name)
            assert family is None or family.kind == "counter", f"{q.where}: {fn} of a {family}"


def test_dashboard_layout_imports() -> None:
    doc = dashboard()
    assert doc["uid"] and doc["title"] and isinstance(doc["schemaVersion"], int)
    variables = {v["name"] for v in doc["templating"]["list"]}
    assert {"datasource", "job", "product", "program"} <= variables
    all_panels = panels(doc)
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in all_panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        own = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not own & cells, f"panel {p['title']!r} overlaps another"
        cells |= own
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        assert all(t["expr"].strip() for t in p["targets"]), p["title"]
    # One tokens panel per program: Grafana repeats it for each selected program.
    (tokens,) = [p for p in all_panels if "access_proxy_tokens_total" in str(p.get("targets"))]
    assert tokens["repeat"] == "program"
    assert "$program" in tokens["title"]


def test_alerts_cover_spec_12() -> None:
    by_family: dict[str, list[str]] = {}
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        for family in Query("", rule["expr"]).families():
            by_family.setdefault(family, []).append(rule["alert"])
    wanted = {
        "Redis errors": "access_proxy_redis_errors_total",
        "failure modes": "access_proxy_failure_mode_total",
        "config reload errors": "access_proxy_config_reloads_total",
        "5xx rate": "access_proxy_requests_total",
        "p99 latency": "access_proxy_decision_duration_seconds",
        "unmetered answers": "access_proxy_unmetered_answers_total",
    }
    for what, family in wanted.items():
        assert by_family.get(family), f"no alert on {what} ({family})"


def test_5xx_alert_counts_exactly_the_codes_answered_5xx() -> None:
    (rule,) = [r for r in alert_rules() if r["alert"] == "AccessProxyHigh5xxRate"]
    (regex,) = re.findall(r'code=~"([^"]+)"', rule["expr"])
    # store_unavailable answers only the admin API, which access_proxy_requests_total never counts.
    admin_only = {"store_unavailable"}
    assert set(regex.split("|")) == {c for c, e in CODES.items() if e.status >= 500} - admin_only


def test_every_alert_has_a_promtool_case_that_fires() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    firing: dict[str, int] = {}
    quiet: dict[str, int] = {}
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            into = firing if check.get("exp_alerts") else quiet
            into[check["alertname"]] = into.get(check["alertname"], 0) + 1
    alerts = {r["alert"] for r in alert_rules()}
    assert alerts - set(firing) == set(), "alerts without a firing case"
    assert set(firing) | set(quiet) <= alerts


def test_unmetered_alert_names_known_reasons_and_leaves_out_the_natural_ones() -> None:
    (rule,) = [r for r in alert_rules() if r["alert"] == "AccessProxyUnmeteredAnswers"]
    (regex,) = re.findall(r'reason=~"([^"]+)"', rule["expr"])
    reasons = set(regex.split("|"))
    assert reasons <= set(metrics.UNMETERED_REASONS)
    assert reasons == set(metrics.UNMETERED_REASONS) - {"upstream_error", "incomplete"}
