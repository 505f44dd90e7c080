"""The admin API of a real ``serve`` under bad bodies and a Redis that goes away (SPEC §7).

- JSON nested 1,000 deep, unpaired surrogates, invalid UTF-8 and huge values answer 422 naming the
  field, on every endpoint that takes a body; nothing is logged as a traceback.
- Writes while Redis is killed answer 503 ``store_unavailable`` with ``retry-after`` and write
  nothing; the first write after Redis is back succeeds, and the audit chain verifies.
- A property-based run (hypothesis) posts generated bodies, ids, query strings and times to every
  admin endpoint with a token holding every role: never a 5xx, a 422 for an object body names the
  field, and the audit chain verifies afterwards.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.redis_server import RedisServer
from proxy.store import schema
from proxy.store.audit import verify_chain
from tests.e2e.conftest import ServeProcess, Stack

TOKEN = "faults-all-roles-token-0123456789"
ROLES = ["operator", "approver:provider", "approver:government"]
ADMIN = {
    "admin": {
        "tokens": [
            {"name": "all", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(), "roles": ROLES}
        ]
    }
}
PROGRAM = "gpt-5.6-preview"


@dataclass
class AdminProxy:
    serve: ServeProcess
    redis: RedisServer

    def call(
        self, method: str, path: str, body: bytes | None = None, token: str = TOKEN
    ) -> tuple[int, dict[str, str], Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.serve.admin_port, timeout=30)
        try:
            headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            found = {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()
        doc = (
            json.loads(raw)
            if raw and found.get("content-type", "").startswith("application/json")
            else raw
        )
        return resp.status, found, doc

    def post(self, path: str, doc: Any) -> tuple[int, dict[str, str], Any]:
        return self.call("POST", path, json.dumps(doc).encode())


@pytest.fixture(scope="module")
def admin_proxy(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminProxy]:
    server = RedisServer(tmp_path_factory.mktemp("admin-faults-redis"))
    server.start_sync()
    try:
        serve = stack.start_serve("admin-faults", redis_url=server.url, overrides=ADMIN)
        try:
            yield AdminProxy(serve, server)
        finally:
            assert serve.stop() == 0, serve.log()
    finally:
        server.stop_sync()


def audit_breaks(url: str) -> tuple[int, int | None]:
    """(entries, seq of the first broken entry or None) of the whole audit chain."""
    client = redis.Redis.from_url(url)
    try:
        entries = [json.loads(r) for r in client.lrange(schema.AUDIT_LIST, 0, -1)]
    finally:
        client.close()
    return len(entries), verify_chain(entries)


def seed_world(admin: AdminProxy, suffix: str) -> dict[str, str]:
    """An org, a workspace, a key and a grant, made through the API: ids the fuzz can hit."""
    org, ws = f"org-{suffix}", f"ws-{suffix}"
    assert admin.post("/admin/v1/orgs", {"id": org, "account_representative": "alice"})[0] == 201
    assert admin.post("/admin/v1/workspaces", {"id": ws, "org_id": org})[0] == 201
    status, _, key = admin.post(f"/admin/v1/workspaces/{ws}/keys", {"name": "k"})
    assert status == 201, key
    status, _, grant = admin.post(
        "/admin/v1/grants", {"program": PROGRAM, "product": "api", "subject": f"workspace:{ws}"}
    )
    assert status == 201, grant
    return {"org": org, "ws": ws, "key_id": key["key_id"], "grant_id": grant["grant_id"]}


# Every endpoint that takes a body: (method, path template, the fields it knows).
BODY_ENDPOINTS: list[tuple[str, str, tuple[str, ...]]] = [
    ("POST", "/admin/v1/orgs", ("id", "name", "account_representative")),
    ("PATCH", "/admin/v1/orgs/{org}", ("account_representative",)),
    ("POST", "/admin/v1/orgs/{org}/suspend", ("reason",)),
    ("POST", "/admin/v1/orgs/{org}/reinstate", ("reason",)),
    ("POST", "/admin/v1/workspaces", ("id", "org_id", "name")),
    ("POST", "/admin/v1/workspaces/{ws}/suspend", ("reason",)),
    ("POST", "/admin/v1/workspaces/{ws}/reinstate", ("reason",)),
    ("POST", "/admin/v1/workspaces/{ws}/keys", ("name",)),
    ("POST", "/admin/v1/workspaces/{ws}/flags", ("category", "severity", "source", "note")),
    ("POST", "/admin/v1/workspaces/{ws}/standing/clear", ("reason",)),
    ("POST", "/admin/v1/grants", ("program", "product", "subject", "models", "expires_at")),
    ("POST", "/admin/v1/grants/{grant_id}/approve", ("role", "reviewer")),
    ("POST", "/admin/v1/grants/{grant_id}/enable", ("at",)),
    ("POST", "/admin/v1/grants/{grant_id}/suspend", ("reason",)),
    ("POST", "/admin/v1/grants/{grant_id}/reinstate", ("reason",)),
    ("POST", "/admin/v1/grants/{grant_id}/revoke", ("reason",)),
    ("POST", "/admin/v1/config/reload", ()),
]


def nested(depth: int) -> Any:
    value: Any = "x"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def nested_text(depth: int) -> str:
    """JSON text nested ``depth`` deep (deeper than ``json.dumps`` can write)."""
    opens = "".join('{"k": ' if i % 2 == 0 else "[" for i in reversed(range(depth)))
    closes = "".join("}" if i % 2 == 0 else "]" for i in range(depth))
    return opens + '"x"' + closes


def assert_error_shape(doc: Any) -> dict[str, Any]:
    assert isinstance(doc, dict) and set(doc["error"]) >= {"message", "type", "code", "param"}, doc
    return dict(doc["error"])


def test_bad_bodies_answer_422_naming_the_field_on_every_endpoint(admin_proxy: AdminProxy) -> None:
    ids = seed_world(admin_proxy, "bad-bodies")
    entries_before, broken = audit_breaks(admin_proxy.redis.url)
    assert broken is None
    for method, template, fields in BODY_ENDPOINTS:
        path = template.format(**ids)
        for field in fields:
            for what, raw in (
                ("1000 deep", f'{{"{field}": {nested_text(1000)}}}'.encode()),
                ("65 deep", json.dumps({field: nested(65)}).encode()),
                ("surrogates", b'{"%s": "\\udfff\\ud800"}' % field.encode()),
                ("surrogate inside", json.dumps({field: ["ok", {"a": "\ud800"}]}).encode()),
                ("huge", json.dumps({field: "x" * 500_000}).encode()),
            ):
                status, _, doc = admin_proxy.call(method, path, raw)
                assert status == 422, (path, field, what, status, doc)
                error = assert_error_shape(doc)
                assert error["code"] == "invalid_body" and error["param"] == field, (
                    path,
                    what,
                    error,
                )
        for what, raw in (
            ("invalid UTF-8", b'{"reason": "\xff\xfe"}'),
            ("1000 deep array", nested_text(1000).encode()),
            ("not an object", b"[1, 2]"),
            ("too large", b'{"reason": "' + b"x" * (2 << 20) + b'"}'),
        ):
            status, _, doc = admin_proxy.call(method, path, raw)
            assert status == 422, (path, what, status, doc)
            assert assert_error_shape(doc)["code"] == "invalid_body"
    # 64 levels are still a body (refused for its type, not its depth).
    status, _, doc = admin_proxy.post(
        f"/admin/v1/orgs/{ids['org']}/suspend", {"reason": nested(63)}
    )
    assert status == 422 and "nests" not in doc["error"]["message"], doc
    assert audit_breaks(admin_proxy.redis.url) == (entries_before, None)
    assert "Traceback" not in admin_proxy.serve.log()


def test_writes_while_redis_is_away_answer_503_and_write_nothing(admin_proxy: AdminProxy) -> None:
    ids = seed_world(admin_proxy, "outage")
    entries_before, broken = audit_breaks(admin_proxy.redis.url)
    assert broken is None
    server = admin_proxy.redis
    assert server.pid is not None
    os.kill(server.pid, signal.SIGKILL)
    server.stop_sync()  # reaps the killed process
    try:
        writes = [
            ("POST", "/admin/v1/orgs", {"id": "org-during-outage"}),
            ("POST", "/admin/v1/workspaces", {"id": "ws-during-outage", "org_id": ids["org"]}),
            ("POST", f"/admin/v1/workspaces/{ids['ws']}/keys", {}),
            ("POST", f"/admin/v1/workspaces/{ids['ws']}/suspend", {"reason": "outage"}),
            ("POST", f"/admin/v1/grants/{ids['grant_id']}/revoke", {"reason": "outage"}),
            (
                "POST",
                f"/admin/v1/workspaces/{ids['ws']}/flags",
                {"category": "cyber", "severity": 9, "source": "analyst"},
            ),
            ("DELETE", f"/admin/v1/keys/{ids['key_id']}", None),
            ("GET", "/admin/v1/audit", None),
            ("GET", f"/admin/v1/grants/{ids['grant_id']}", None),
        ]
        for method, path, doc in writes:
            body = None if doc is None else json.dumps(doc).encode()
            status, headers, answer = admin_proxy.call(method, path, body)
            assert status == 503, (method, path, status, answer)
            error = assert_error_shape(answer)
            assert error["code"] == "store_unavailable" and error["type"] == "server_error"
            assert int(headers["retry-after"]) >= 1
    finally:
        server.start_sync()
    # Nothing of the refused writes is there, and the chain is whole.
    assert audit_breaks(server.url) == (entries_before, None)
    client = redis.Redis.from_url(server.url)
    try:
        assert not client.exists(schema.org_key("org-during-outage"))
        assert not client.exists(schema.workspace_key("ws-during-outage"))
    finally:
        client.close()
    status, _, standing = admin_proxy.call("GET", f"/admin/v1/workspaces/{ids['ws']}/standing")
    assert status == 200 and standing["flags"] == [] and not standing["suspended"], standing
    # The first write after Redis is back succeeds (no stale pooled connection answers it).
    status, _, doc = admin_proxy.post("/admin/v1/orgs", {"id": "org-after-outage"})
    assert status == 201, doc
    assert audit_breaks(server.url) == (entries_before + 1, None)
    assert "Traceback" not in admin_proxy.serve.log()


# ---------------------------------------------------------------------------- the fuzz

SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
TEXT = st.one_of(
    st.text(max_size=20),
    st.text(st.one_of(st.characters(), SURROGATES), max_size=10),
    st.sampled_from(
        ["", " ", "../../etc/passwd", "a/b", "%2e%2e", "ws-\u212a", "ａｂｃ", "x" * 300]
    ),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
)
DAYS = st.sampled_from(["2026-11-30", "2026-02-30", "30-11-2026", "0000-01-01", "9999-12-31"])
TIMES = st.one_of(
    DAYS,
    st.sampled_from(
        [
            "2026-12-01T09:00:00Z",
            "2026-12-01T09:00:00.123456789+02:00",
            "2026-02-30T09:00:00Z",
            "2026-13-01T09:00:00Z",
            "9999-12-31T23:59:59-23:59",
            "0000-01-01T00:00:00Z",
            "2026-12-01 09:00:00",
            "yesterday",
        ]
    ),
    st.datetimes().map(lambda d: d.isoformat() + "Z"),
)
PLAUSIBLE = st.sampled_from(
    [
        PROGRAM,
        "api",
        "codex",
        "workspace:ws-fuzz",
        "org:org-fuzz",
        "provider",
        "government",
        "cyber",
        "analyst",
        "alice",
        "new-id",
        "gpt-5.6-sol",
    ]
)
SCALARS = st.one_of(
    PLAUSIBLE,
    st.integers(min_value=0, max_value=10),
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**30, max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
    TIMES,
)
VALUES = (
    st.recursive(
        SCALARS,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)
        ),
        max_leaves=12,
    )
    | st.integers(min_value=60, max_value=400).map(nested)
    | st.just("y" * 20_000)
)


@st.composite
def admin_requests(draw: st.DrawFn, ids: dict[str, str]) -> tuple[str, str, bytes | None, Any]:
    """(method, path, raw body, the document sent or None when the body is not a JSON doc)."""

    def an_id(name: str) -> str:
        known = ids[name]
        value = draw(st.one_of(st.just(known), TEXT.filter(bool)))
        return urllib.parse.quote(value.encode("utf-8", "surrogatepass"), safe="")

    kind = draw(st.sampled_from(["body", "body", "body", "delete", "get"]))
    if kind == "delete":
        return "DELETE", f"/admin/v1/keys/{an_id('key_id')}", None, None
    if kind == "get":
        query = urllib.parse.urlencode(
            draw(
                st.dictionaries(
                    st.sampled_from(
                        [
                            "subject",
                            "program",
                            "product",
                            "key_id",
                            "workspace",
                            "model",
                            "after",
                            "limit",
                            "from",
                            "to",
                            "x",
                        ]
                    ),
                    TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")),
                    max_size=3,
                )
            )
        )
        path = draw(
            st.sampled_from(
                [
                    "/admin/v1/grants",
                    f"/admin/v1/grants/{an_id('grant_id')}",
                    "/admin/v1/explain",
                    "/admin/v1/audit",
                    f"/admin/v1/orgs/{an_id('org')}",
                    f"/admin/v1/workspaces/{an_id('ws')}/standing",
                    f"/admin/v1/workspaces/{an_id('ws')}/usage",
                ]
            )
        )
        return "GET", path + ("?" + query if query else ""), None, None
    method, template, fields = draw(st.sampled_from(BODY_ENDPOINTS))
    path = template.format(
        org=an_id("org"), ws=an_id("ws"), grant_id=an_id("grant_id"), key_id=an_id("key_id")
    )
    known = st.sampled_from(fields) if fields else TEXT
    names = draw(st.lists(st.one_of(known, TEXT), max_size=5, unique=True))
    doc = {name: draw(VALUES) for name in names}
    shape = draw(st.sampled_from(["json", "json", "json", "raw", "not-object"]))
    if shape == "raw":
        return method, path, draw(st.binary(max_size=64)), None
    if shape == "not-object":
        return method, path, json.dumps(draw(VALUES)).encode(), None
    return method, path, json.dumps(doc).encode(), doc


@pytest.fixture(scope="module")
def fuzz_ids(admin_proxy: AdminProxy) -> dict[str, str]:
    return seed_world(admin_proxy, "fuzz")


def test_generated_admin_requests_never_answer_5xx(
    admin_proxy: AdminProxy, fuzz_ids: dict[str, str]
) -> None:
    seen: dict[int, int] = {}

    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(admin_requests(fuzz_ids))
    def one(req: tuple[str, str, bytes | None, Any]) -> None:
        method, path, raw, doc = req
        status, _, answer = admin_proxy.call(method, path, raw)
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, (method, path, raw and raw[:300], status, answer)
        if status >= 400:
            error = assert_error_shape(answer)
            if status == 422 and isinstance(doc, dict) and error["code"] == "invalid_body":
                assert error["param"] is not None, (path, doc, error)

    started = time.monotonic()
    one()
    print(f"statuses {sorted(seen.items())} in {time.monotonic() - started:.1f} s")
    count, broken = audit_breaks(admin_proxy.redis.url)
    assert broken is None and count > 0
    assert "Traceback" not in admin_proxy.serve.log()
