"""The dashboard and the alert rules read metrics that exist (SPEC §9, §12): every family they
name, and every family SPEC §9 lists, is declared on ``/metrics`` of a running ``serve``, with the
type the queries assume (a quantile needs a histogram, a rate a counter) and no label SPEC §9 does
not list."""

from __future__ import annotations

import re

import aiohttp

from tests.deploy_refs import KNOWN, SPEC_9, TARGET_LABELS, referenced_families
from tests.e2e.conftest import Seeder, Stack, assert_allowed, request

_TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$", re.MULTILINE)
_SAMPLE = re.compile(r"^(access_proxy_[a-z0-9_]+)(?:\{([^}]*)\})? ", re.MULTILINE)
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="')


def exposed(text: str) -> tuple[dict[str, str], dict[str, set[str]]]:
    """``({family: type}, {family: label names seen})`` of the access_proxy_* families."""
    types = {name: kind for name, kind in _TYPE_LINE.findall(text) if name.startswith("access_")}
    labels: dict[str, set[str]] = {}
    for name, body in _SAMPLE.findall(text):
        family = re.sub(r"_(bucket|sum|count|created)$", "", name)
        family = family if family in types else name
        labels.setdefault(family, set()).update(_LABEL.findall(body or ""))
    return types, labels


async def test_dashboard_and_rules_read_metrics_that_exist(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await seed.tenant()
    await seed.grant(f"workspace:{tenant.workspace}")
    assert_allowed(await request(http, stack.proxy.data_url, key=tenant.key, model="gpt-5.6-sol"))
    async with http.get(stack.proxy.admin_url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    types, labels = exposed(text)

    wanted = referenced_families() | set(SPEC_9)
    missing = wanted - set(types)
    assert not missing, f"named by deploy/ or SPEC §9, absent from /metrics: {missing}"
    for family in wanted & set(types):
        assert types[family] == KNOWN[family].kind, (family, types[family])
        extra = labels.get(family, set()) - KNOWN[family].labels - {"le"} - TARGET_LABELS
        assert not extra, f"{family} has labels SPEC §9 does not list: {extra}"
    # The request just made shows under the labels the dashboard groups by.
    assert {"product", "program", "code"} <= labels["access_proxy_requests_total"]
    assert {"product", "le"} <= labels["access_proxy_request_duration_seconds"]
