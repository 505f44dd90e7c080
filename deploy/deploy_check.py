"""``make deploy-check``: the Prometheus side of deploy/ checked with promtool.

- ``promtool check rules`` and ``promtool test rules`` on deploy/prometheus/ (every alert fires on
  its case and stays quiet on its near miss);
- every PromQL expression of the Grafana dashboard (panels, variables, annotations), with
  Grafana's variables filled in, parsed by ``promtool check rules`` as recording rules.

promtool comes from Debian's ``prometheus`` package (or any Prometheus release); ``PROMTOOL``
names another binary.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
RULES = DEPLOY / "prometheus" / "access-proxy-rules.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "access-proxy-rules.test.yaml"
DASHBOARDS = sorted((DEPLOY / "grafana").glob("*.json"))
# What Grafana puts in place of its variables before sending a query.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "6h",
    "$job": ".*",
    "$product": ".*",
    "$program": ".*",
}
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*\w+\)$")


def dashboard_queries(doc: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """``(location, PromQL)`` for every query in a dashboard document."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            here = f"{where}.{key}" if where else key
            if key == "expr" and isinstance(value, str):
                yield here, value
            elif key == "definition" and isinstance(value, str):
                found = LABEL_VALUES.match(value.strip())
                if found:
                    yield here, found["selector"]
            else:
                yield from dashboard_queries(value, here)
    elif isinstance(doc, list):
        for i, item in enumerate(doc):
            yield from dashboard_queries(item, f"{where}[{i}]")


def fill_variables(expr: str) -> str:
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    if "$" in expr:
        raise SystemExit(f"unknown Grafana variable in: {expr}")
    return expr


def promtool(*args: str) -> None:
    tool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if tool is None:
        raise SystemExit(
            "promtool not found: install it (Debian: apt-get install prometheus) or set PROMTOOL"
        )
    print("+ promtool", " ".join(args), flush=True)
    done = subprocess.run([tool, *args], cwd=DEPLOY / "prometheus", check=False)
    if done.returncode != 0:
        raise SystemExit(f"promtool {args[0]} {args[1]} failed ({done.returncode})")


def main() -> int:
    promtool("check", "rules", RULES.name)
    promtool("test", "rules", RULE_TESTS.name)
    for dashboard in DASHBOARDS:
        queries = list(dashboard_queries(json.loads(dashboard.read_text())))
        rules = [
            {"record": f"dashboard:query_{i}", "expr": fill_variables(expr)}
            for i, (_, expr) in enumerate(queries)
        ]
        doc = {"groups": [{"name": dashboard.stem, "rules": rules}]}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{dashboard.stem}-queries.yaml"
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
            print(f"{dashboard.relative_to(DEPLOY.parent)}: {len(queries)} queries", flush=True)
            promtool("check", "rules", str(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
