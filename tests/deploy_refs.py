"""What deploy/grafana and deploy/prometheus refer to, for the tests that hold them to SPEC §9
and to ``/metrics``: the metric families and labels SPEC §9 names, and the metric and label names
each PromQL expression of the dashboard and the alert rules uses."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "access-proxy.json"
RULES = REPO / "deploy" / "prometheus" / "access-proxy-rules.yaml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "access-proxy-rules.test.yaml"


@dataclass(frozen=True)
class Family:
    kind: str  # counter | gauge | histogram
    labels: frozenset[str]


def _f(kind: str, *labels: str) -> Family:
    return Family(kind, frozenset(labels))


# SPEC §9, as written there: name -> type and labels.
SPEC_9: dict[str, Family] = {
    "access_proxy_requests_total": _f("counter", "product", "program", "code"),
    "access_proxy_request_duration_seconds": _f("histogram", "product"),
    "access_proxy_decision_duration_seconds": _f("histogram"),
    "access_proxy_upstream_ttfb_seconds": _f("histogram", "upstream"),
    "access_proxy_inflight_requests": _f("gauge"),
    "access_proxy_cache_lookups_total": _f("counter", "result"),
    "access_proxy_cache_invalidations_total": _f("counter"),
    "access_proxy_redis_errors_total": _f("counter", "op"),
    "access_proxy_config_reloads_total": _f("counter", "result"),
    "access_proxy_config_info": _f("gauge", "version"),
    "access_proxy_misuse_flags_total": _f("counter", "category", "source"),
    "access_proxy_tier_transitions_total": _f("counter", "tier"),
    "access_proxy_tokens_total": _f("counter", "program", "kind"),
    "access_proxy_cost_usd_total": _f("counter", "program", "product"),
    "access_proxy_unmetered_answers_total": _f("counter", "program", "reason"),
    "access_proxy_access_log_dropped_total": _f("counter"),
    "access_proxy_websocket_sessions": _f("gauge", "product"),
    "access_proxy_websocket_closed_total": _f("counter", "product", "reason"),
}
# Beyond SPEC §9, documented in the README's metrics table.
PROJECT_EXTRA: dict[str, Family] = {
    "access_proxy_failure_mode_total": _f("counter", "check", "mode"),
    "access_proxy_shadow_decisions_total": _f("counter", "rule"),
}
KNOWN = SPEC_9 | PROJECT_EXTRA
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "service"})

_METRIC = re.compile(r"\b(access_proxy_[a-z0-9_]+)")
_SELECTOR = re.compile(r"\b(access_proxy_[a-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")


def family_of(name: str) -> str:
    """``x_bucket`` / ``x_sum`` / ``x_count`` of a known histogram ``x`` -> ``x``."""
    base = _HISTOGRAM_SUFFIX.sub("", name)
    if base != name and KNOWN.get(base, Family("", frozenset())).kind == "histogram":
        return base
    return name


@dataclass(frozen=True)
class Query:
    where: str
    expr: str

    def families(self) -> set[str]:
        return {family_of(m) for m in _METRIC.findall(self.expr)}

    def matcher_labels(self) -> list[tuple[str, str]]:
        """``(family, label)`` for every label matcher inside a selector."""
        return [
            (family_of(name), label)
            for name, body in _SELECTOR.findall(self.expr)
            for label in _MATCHER.findall(body)
        ]

    def grouping_labels(self) -> set[str]:
        return {
            label.strip() for group in _GROUPING.findall(self.expr) for label in group.split(",")
        } - {""}


def _walk(doc: Any, where: str) -> list[Query]:
    found: list[Query] = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            here = f"{where}.{key}"
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(Query(here, value))
            else:
                found += _walk(value, here)
    elif isinstance(doc, list):
        for i, item in enumerate(doc):
            found += _walk(item, f"{where}[{i}]")
    return found


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def dashboard_queries() -> list[Query]:
    return _walk(dashboard(), DASHBOARD.name)


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def rule_queries() -> list[Query]:
    return [Query(f"{RULES.name}:{r['alert']}", r["expr"]) for r in alert_rules()]


def referenced_families() -> set[str]:
    """Every access_proxy_* family the dashboard or the alert rules name."""
    return {f for q in dashboard_queries() + rule_queries() for f in q.families()}
