"""WebSocket sessions (the Realtime API) end to end (SPEC §3.3, §3.4, §3.5, §5, §9): a real
WebSocket client (aiohttp's ``ws_connect``) against a real ``serve`` process and the mock
upstream's realtime socket.

An allowed session relays text, binary, pings and close codes both ways under the forwarding
rules; a refused upgrade is answered before upgrading; a ``session.update`` to a model the caller
may not use, a revocation, a suspension and a phase closed by a reload end an open session with an
``error`` event and close 1008 well within the cache TTL; and no spelling of the query string opens
a session on a preview model for a caller without access.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import wait_until
from tests.e2e.conftest import (
    ALPHA,
    UPSTREAM_SECRET,
    Seeder,
    Stack,
    Tenant,
    assert_error,
    metric_samples,
    request,
)

PREVIEW_MODEL = "gpt-5.6-sol"
PREVIEW_MODELS = ("gpt-5.6-sol", "gpt-5.6-terra", "gpt-5.6-luna")
OPEN_MODEL = "gpt-4o-mini"  # in no program: allowed to any workspace (unlisted_models: allow)
ENDED_WITHIN_S = 2.0
# Access ending reaches an open session through the invalidation signal or the config swap in
# milliseconds (the propagation target is 100 ms); without them the sweep would take up to 1 s
# (with facts evicted) or the TTL. The bound is generous for a busy host, and tight enough that
# a broken signal path fails these tests.
SIGNAL_WITHIN_S = 0.5
RECEIVE_S = 10.0
UPGRADE_HEADERS = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


def ws_url(base: str, query: str, prefix: str = "/v1") -> str:
    return base.replace("http://", "ws://") + f"{prefix}/realtime?{query}"


async def connect(
    http: aiohttp.ClientSession,
    base: str,
    key: str | None,
    query: str,
    *,
    prefix: str = "/v1",
    headers: dict[str, str] | None = None,
    **kw: Any,
) -> aiohttp.ClientWebSocketResponse:
    h = dict(headers or {})
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    return await http.ws_connect(ws_url(base, query, prefix), headers=h, **kw)


async def receive_json(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive(timeout=RECEIVE_S)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    doc: dict[str, Any] = json.loads(msg.data)
    return doc


async def mock_sessions(
    http: aiohttp.ClientSession, mock_url: str, request_id: str | None = None
) -> list[dict[str, Any]]:
    params = {"request_id": request_id} if request_id else {}
    async with http.get(mock_url + "/_mock/realtime", params=params) as resp:
        found: list[dict[str, Any]] = (await resp.json())["sessions"]
        return found


async def granted(seed: Seeder) -> Tenant:
    tenant = await seed.tenant()
    await seed.grant(f"workspace:{tenant.workspace}")
    return tenant


async def assert_ended(
    ws: aiohttp.ClientWebSocketResponse, code: str, started: float, within: float
) -> float:
    """The session gets an ``error`` event with ``code``, then close 1008; seconds taken."""
    event = await receive_json(ws)
    while event.get("type") != "error":  # events the upstream sent before the end
        event = await receive_json(ws)
    elapsed = time.monotonic() - started
    assert event["error"]["code"] == code, event
    assert set(event["error"]) >= {"message", "type", "code", "param"}, event
    msg = await ws.receive(timeout=RECEIVE_S)
    assert msg.type is aiohttp.WSMsgType.CLOSE, msg
    assert msg.data == 1008, msg
    assert ws.closed or (await ws.receive(timeout=RECEIVE_S)).type is aiohttp.WSMsgType.CLOSED
    assert elapsed < within, f"ended after {elapsed:.3f} s"
    return elapsed


def closed_total(samples: list[tuple[str, dict[str, str], float]], reason: str) -> float:
    return sum(
        v
        for n, labels, v in samples
        if n == "access_proxy_websocket_closed_total" and labels.get("reason") == reason
    )


# ---------------------------------------------------------------------------- allowed sessions


async def test_allowed_session_relays_text_binary_pings_and_close_codes(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await granted(seed)
    before = await metric_samples(http, stack.proxy.admin_url)
    ws = await connect(
        http,
        stack.proxy.data_url,
        tenant.key,
        f"model={PREVIEW_MODEL}",
        headers={"x-workspace-id": "someone-else", "X-Forwarded-For": "6.6.6.6"},
        protocols=("realtime",),
        autoping=False,
    )
    rid = ws._response.headers["x-request-id"]
    assert ws.protocol == "realtime"
    created = await receive_json(ws)
    assert created["type"] == "session.created"
    assert created["session"]["model"] == PREVIEW_MODEL

    # Text both ways: an answer streamed as several events.
    await ws.send_str(json.dumps({"type": "response.create"}))
    kinds = []
    while not kinds or kinds[-1] != "response.done":
        kinds.append((await receive_json(ws))["type"])
    assert kinds[0] == "response.created" and "response.text.delta" in kinds

    # Binary both ways, byte for byte.
    blob = bytes(range(256)) * 64
    await ws.send_bytes(blob)
    msg = await ws.receive(timeout=RECEIVE_S)
    assert msg.type is aiohttp.WSMsgType.BINARY and msg.data == blob

    # A client ping is answered by the upstream's pong; an upstream ping reaches the client
    # and the client's pong reaches the upstream.
    await ws.ping(b"client-ping")
    msg = await ws.receive(timeout=RECEIVE_S)
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.PONG, b"client-ping")
    await ws.send_str(json.dumps({"type": "mock.ping", "payload": "upstream-ping"}))
    msg = await ws.receive(timeout=RECEIVE_S)
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.PING, b"upstream-ping")
    await ws.pong(msg.data)

    async def pong_seen() -> bool:
        found = await mock_sessions(http, stack.mock.url, rid)
        return bool(found) and found[0]["pongs"] == ["upstream-ping"]

    await wait_until(pong_seen, timeout=RECEIVE_S)

    # The client's close code reaches the upstream.
    await ws.close(code=4000, message=b"bye")
    assert ws.close_code == 4000

    async def upstream_closed() -> dict[str, Any] | None:
        found = await mock_sessions(http, stack.mock.url, rid)
        return found[0] if found and found[0]["close_code"] is not None else None

    await wait_until(upstream_closed, timeout=RECEIVE_S)
    record = await upstream_closed()
    assert record is not None and record["close_code"] == 4000

    # Forwarding rules: the upstream saw its own credential, never the client's key or claims.
    headers = {k.lower(): v for k, v in record["headers"]}
    assert headers["authorization"] == f"Bearer {UPSTREAM_SECRET}"
    assert tenant.key not in json.dumps(record["headers"])
    assert "x-workspace-id" not in headers
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-request-id"] == rid
    assert record["protocol"] == "realtime"

    async def counted() -> bool:
        after = await metric_samples(http, stack.proxy.admin_url)
        return closed_total(after, "client") == closed_total(before, "client") + 1

    await wait_until(counted, timeout=RECEIVE_S)


async def test_upstream_close_code_reaches_the_client_and_sessions_are_gauged(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await granted(seed)

    def open_sessions(samples: list[tuple[str, dict[str, str], float]]) -> float:
        return sum(
            v
            for n, labels, v in samples
            if n == "access_proxy_websocket_sessions" and labels.get("product") == "api"
        )

    before = await metric_samples(http, stack.proxy.admin_url)
    ws = await connect(http, stack.proxy.data_url, tenant.key, f"model={PREVIEW_MODEL}")
    await receive_json(ws)
    during = await metric_samples(http, stack.proxy.admin_url)
    assert open_sessions(during) == open_sessions(before) + 1
    await ws.send_str(json.dumps({"type": "mock.close", "code": 4001, "reason": "done"}))
    msg = await ws.receive(timeout=RECEIVE_S)
    assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 4001, "done")

    async def settled() -> bool:
        after = await metric_samples(http, stack.proxy.admin_url)
        return (
            open_sessions(after) == open_sessions(before)
            and closed_total(after, "upstream") == closed_total(before, "upstream") + 1
        )

    await wait_until(settled, timeout=RECEIVE_S)


async def test_key_as_subprotocol_identifies_and_never_goes_upstream(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await granted(seed)
    ws = await connect(
        http,
        stack.proxy.data_url,
        None,
        f"model={PREVIEW_MODEL}",
        protocols=("realtime", f"openai-insecure-api-key.{tenant.key}"),
    )
    rid = ws._response.headers["x-request-id"]
    assert ws.protocol == "realtime"
    assert (await receive_json(ws))["type"] == "session.created"
    await ws.close()
    record = (await mock_sessions(http, stack.mock.url, rid))[0]
    assert tenant.key not in json.dumps(record["headers"])


# ---------------------------------------------------------------------------- refused upgrades


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("no key", "invalid_api_key"),
        ("unknown key", "invalid_api_key"),
        ("no grant", "model_not_found"),
        ("closed phase", "product_unavailable"),
        ("no model", "invalid_request"),
        ("two models", "invalid_request"),
        ("preview spelled loosely", "model_not_found"),
    ],
)
async def test_refused_upgrade_is_answered_before_upgrading(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession, case: str, code: str
) -> None:
    tenant = await seed.tenant()
    key: str | None = tenant.key
    query, prefix = f"model={PREVIEW_MODEL}", "/v1"
    if case == "no key":
        key = None
    elif case == "unknown key":
        key = tenant.key[:-4] + "AAAA"
    elif case == "closed phase":
        await seed.grant(f"workspace:{tenant.workspace}", product="chatgpt")
        prefix = "/chatgpt/v1"
    elif case == "no model":
        query = "voice=alloy"
    elif case == "two models":
        query = f"model={OPEN_MODEL}&model={PREVIEW_MODEL}"
    else:
        query = f"model=%20{PREVIEW_MODEL.upper()}%20"
    answer = await request(
        http,
        stack.proxy.data_url,
        f"{prefix}/realtime?{query}",
        key=key,
        method="GET",
        headers=UPGRADE_HEADERS,
    )
    assert_error(answer, code)
    assert answer.headers.get("Connection", "").lower() == "close"
    assert not await mock_sessions(http, stack.mock.url, answer.headers["x-request-id"])
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await connect(http, stack.proxy.data_url, key, query, prefix=prefix)
    assert refused.value.status == answer.status


# ---------------------------------------------------------------------------- access ends


async def test_session_update_to_a_model_without_access_ends_the_session(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await seed.tenant()
    await seed.grant(f"workspace:{tenant.workspace}", program=ALPHA)
    ws = await connect(http, stack.proxy.data_url, tenant.key, f"model={OPEN_MODEL}")
    rid = ws._response.headers["x-request-id"]
    await receive_json(ws)
    # A model the caller may use passes, as does an event that names none.
    allowed = {"type": "session.update", "session": {"model": "gpt-5.5-alpha"}}
    await ws.send_str(json.dumps(allowed))
    assert (await receive_json(ws))["session"]["model"] == "gpt-5.5-alpha"
    await ws.send_str(json.dumps({"type": "session.update", "session": {"voice": "alloy"}}))
    assert (await receive_json(ws))["type"] == "session.updated"
    # An event that is not JSON is answered with an error and goes no further.
    await ws.send_str("not json {")
    event = await receive_json(ws)
    assert (event["type"], event["error"]["code"]) == ("error", "invalid_request")

    refused = {
        "type": "session.update",
        "event_id": "evt_42",
        "session": {"model": f" {PREVIEW_MODEL.upper()}"},
    }
    started = time.monotonic()
    await ws.send_str(json.dumps(refused))
    await assert_ended(ws, "model_not_found", started, ENDED_WITHIN_S)
    record = (await mock_sessions(http, stack.mock.url, rid))[0]
    assert all(m.strip().lower() not in PREVIEW_MODELS for m in record["models_read"]), record
    assert "not json {" not in json.dumps(record["events"])


async def test_duplicate_model_keys_in_an_event_go_no_further(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await seed.tenant()
    ws = await connect(http, stack.proxy.data_url, tenant.key, f"model={OPEN_MODEL}")
    rid = ws._response.headers["x-request-id"]
    await receive_json(ws)
    sneaky = '{"type": "session.update", "session": {"model": "%s", "model": "%s"}}'
    for first, second in ((PREVIEW_MODEL, OPEN_MODEL), (OPEN_MODEL, PREVIEW_MODEL)):
        await ws.send_str(sneaky % (first, second))
        event = await receive_json(ws)
        assert (event["type"], event["error"]["code"]) == ("error", "invalid_request")
        await ws.send_bytes((sneaky % (first, second)).encode())
        event = await receive_json(ws)
        assert (event["type"], event["error"]["code"]) == ("error", "invalid_request")
    await ws.close()
    record = (await mock_sessions(http, stack.mock.url, rid))[0]
    assert all(m.strip().lower() not in PREVIEW_MODELS for m in record["models_read"]), record


Action = Callable[[Seeder, Tenant, str], Awaitable[object]]


async def _revoke_key(seed: Seeder, t: Tenant, grant: str) -> None:
    await seed.revoke_key(t.key_id)


async def _suspend_workspace(seed: Seeder, t: Tenant, grant: str) -> None:
    await seed.suspend_workspace(t.workspace)


async def _suspend_org(seed: Seeder, t: Tenant, grant: str) -> None:
    await seed.suspend_org(t.org)


async def _suspend_grant(seed: Seeder, t: Tenant, grant: str) -> None:
    await seed.grant_action(grant, "suspend")


async def _revoke_grant(seed: Seeder, t: Tenant, grant: str) -> None:
    await seed.grant_action(grant, "revoke")


@pytest.mark.parametrize(
    ("action", "code"),
    [
        (_revoke_key, "invalid_api_key"),
        (_suspend_workspace, "workspace_suspended"),
        (_suspend_org, "workspace_suspended"),
        (_suspend_grant, "access_suspended"),
        (_revoke_grant, "model_not_found"),
    ],
    ids=["key revoked", "workspace suspended", "org suspended", "grant suspended", "grant revoked"],
)
async def test_access_ending_ends_an_open_session_within_the_target(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession, action: Action, code: str
) -> None:
    tenant = await seed.tenant()
    grant = await seed.grant(f"org:{tenant.org}")
    ws = await connect(http, stack.proxy.data_url, tenant.key, f"model={PREVIEW_MODEL}")
    await receive_json(ws)
    await ws.send_str(json.dumps({"type": "response.create"}))  # traffic in flight
    started = time.monotonic()
    await action(seed, tenant, grant)
    await assert_ended(ws, code, started, SIGNAL_WITHIN_S)

    async def counted() -> bool:
        return closed_total(await metric_samples(http, stack.proxy.admin_url), code) >= 1

    await wait_until(counted, timeout=RECEIVE_S)


async def test_phase_closed_by_a_reload_ends_an_open_session(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    proxy = stack.start_serve("ws-reload")
    try:
        tenant = await granted(seed)
        ws = await connect(http, proxy.data_url, tenant.key, f"model={PREVIEW_MODEL}")
        await receive_json(ws)
        other = await connect(http, proxy.data_url, tenant.key, f"model={OPEN_MODEL}")
        await receive_json(other)
        doc = yaml.safe_load(proxy.config_path.read_text())
        doc["programs"]["gpt-5.6-preview"]["phases"]["api"] = "closed"
        started = time.monotonic()
        proxy.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        proxy.proc.send_signal(signal.SIGHUP)
        await assert_ended(ws, "product_unavailable", started, SIGNAL_WITHIN_S)
        # A session on a model of no program is not touched by the phase of another.
        await other.send_str(json.dumps({"type": "ping.me"}))
        assert (await receive_json(other))["type"] == "mock.echo"
        await other.close()
        # And a new upgrade is refused before upgrading.
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await connect(http, proxy.data_url, tenant.key, f"model={PREVIEW_MODEL}")
        assert refused.value.status == 403
    finally:
        assert proxy.stop() == 0


async def test_concurrency_slot_is_held_while_the_session_is_open(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    proxy = stack.start_serve(
        "ws-slots",
        overrides={
            "rate_limits": {
                "programs": {
                    "gpt-5.6-preview": {"requests_per_minute": 600, "burst": 50, "concurrent": 1}
                }
            }
        },
    )
    try:
        tenant = await granted(seed)
        first = await connect(http, proxy.data_url, tenant.key, f"model={PREVIEW_MODEL}")
        await receive_json(first)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await connect(http, proxy.data_url, tenant.key, f"model={PREVIEW_MODEL}")
        assert refused.value.status == 429
        await first.close()

        async def slot_freed() -> bool:
            try:
                again = await connect(http, proxy.data_url, tenant.key, f"model={PREVIEW_MODEL}")
            except aiohttp.WSServerHandshakeError:
                return False
            await again.close()
            return True

        await wait_until(slot_freed, timeout=RECEIVE_S, interval=0.05)
    finally:
        assert proxy.stop() == 0


# ---------------------------------------------------------------------------- spellings

_NO_ACCESS: dict[str, Tenant] = {}  # one caller without access for every example
_KEYS = ("model", "Model", "MODEL", " model", "model ", "%6Dodel", "mod%65l", "model%20", "+model")


def _spellings(name: str) -> st.SearchStrategy[str]:
    """Spellings an upstream may read as ``name`` or as a model of its program: case, spaces
    (encoded or not), a dated snapshot and a fine-tune."""
    return st.sampled_from(
        [
            name,
            name.upper(),
            name.title(),
            f"%20{name}",
            f"{name}+",
            f"+{name}%09",
            f" {name} ",
            f"{name}-2026-06-24",
            f"ft:{name}:acme:tuned:42",
            f"FT:{name.upper()}:acme::7",
        ]
    )


_QUERY_PART = st.one_of(
    st.tuples(st.sampled_from(_KEYS), st.sampled_from(PREVIEW_MODELS).flatmap(_spellings)),
    st.tuples(st.sampled_from(_KEYS), _spellings(OPEN_MODEL)),
    st.tuples(st.sampled_from(("voice", "x", "modelx", "amodel")), st.sampled_from(PREVIEW_MODELS)),
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    preview=st.tuples(st.sampled_from(_KEYS), st.sampled_from(PREVIEW_MODELS).flatmap(_spellings)),
    others=st.lists(_QUERY_PART, max_size=4),
    where=st.integers(min_value=0, max_value=4),
    separators=st.lists(st.sampled_from("&;"), min_size=5, max_size=5),
)
async def test_no_query_spelling_opens_a_preview_session_without_access(
    stack: Stack,
    seed: Seeder,
    http: aiohttp.ClientSession,
    preview: tuple[str, str],
    others: list[tuple[str, str]],
    where: int,
    separators: list[str],
) -> None:
    tenant = _NO_ACCESS.get(stack.redis_url) or await seed.tenant()  # no grant at all
    _NO_ACCESS[stack.redis_url] = tenant
    parts = list(others)
    parts.insert(min(where, len(parts)), preview)
    query = "".join(
        (separators[i] if i else "") + f"{k}={v}".replace(" ", "%20")
        for i, (k, v) in enumerate(parts)
    )
    opened_before = len(await mock_sessions(http, stack.mock.url))
    try:
        ws = await connect(http, stack.proxy.data_url, tenant.key, query)
    except aiohttp.WSServerHandshakeError as exc:
        assert exc.status in (400, 404), (query, exc.status)
        assert exc.headers is not None
        assert not await mock_sessions(http, stack.mock.url, exc.headers["x-request-id"])
    else:
        await ws.close()
        raise AssertionError(f"a session opened for {query!r}")
    assert len(await mock_sessions(http, stack.mock.url)) == opened_before, query


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    spelled=st.tuples(st.sampled_from(_KEYS), _spellings(PREVIEW_MODEL)),
    noise=st.lists(st.tuples(st.sampled_from(("voice", "x")), st.just("alloy")), max_size=2),
)
async def test_every_spelling_of_an_allowed_model_opens_a_session(
    stack: Stack,
    seed: Seeder,
    http: aiohttp.ClientSession,
    spelled: tuple[str, str],
    noise: list[tuple[str, str]],
) -> None:
    tenant = await granted(seed)
    query = "&".join(f"{k}={v}".replace(" ", "%20") for k, v in [*noise, spelled])
    ws = await connect(http, stack.proxy.data_url, tenant.key, query)
    assert (await receive_json(ws))["type"] == "session.created"
    await ws.close()


async def test_many_sessions_at_once_end_together(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await granted(seed)
    # 8 on the preview (its concurrency cap is 10 per workspace) and 12 on a model of no program.
    models = [PREVIEW_MODEL] * 8 + [OPEN_MODEL] * 12
    sockets = await asyncio.gather(
        *(connect(http, stack.proxy.data_url, tenant.key, f"model={m}") for m in models)
    )
    for ws in sockets:
        await receive_json(ws)
    started = time.monotonic()
    await seed.suspend_workspace(tenant.workspace)
    await asyncio.gather(
        *(assert_ended(ws, "workspace_suspended", started, SIGNAL_WITHIN_S) for ws in sockets)
    )


async def test_shutdown_ends_open_sessions_instead_of_waiting_out_the_grace(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    proxy = stack.start_serve("ws-drain")  # shutdown_grace_s: 10
    tenant = await granted(seed)
    ws = await connect(http, proxy.data_url, tenant.key, f"model={PREVIEW_MODEL}")
    await receive_json(ws)
    started = time.monotonic()
    proxy.terminate()
    msg = await ws.receive(timeout=RECEIVE_S)
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1001), msg
    assert await asyncio.to_thread(proxy.wait_exit) == 0
    assert time.monotonic() - started < 5.0


async def test_revocation_while_the_upstream_handshake_is_pending_ends_the_session(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    """Decided, then revoked before the session is registered: it still ends at once."""
    tenant = await granted(seed)
    tag = f"tag-{tenant.key_id}"
    opening = asyncio.ensure_future(
        connect(
            http,
            stack.proxy.data_url,
            tenant.key,
            f"model={PREVIEW_MODEL}",
            headers={"x-mock-first-byte-delay-ms": "700", "x-test-tag": tag},
        )
    )

    async def upstream_asked() -> bool:
        return any(
            tag in json.dumps(s["headers"]) for s in await mock_sessions(http, stack.mock.url)
        )

    await wait_until(upstream_asked, timeout=RECEIVE_S)
    await seed.revoke_key(tenant.key_id)  # the handshake's answer is still held back
    ws = await opening
    started = time.monotonic()
    await assert_ended(ws, "invalid_api_key", started, SIGNAL_WITHIN_S)


async def test_a_grant_that_expires_ends_its_sessions_by_the_clock(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    """No signal announces an expiry: the sweep (every second at most) sees it."""
    tenant = await seed.tenant()
    await seed.grant(f"workspace:{tenant.workspace}", expires_in=2.0)
    ws = await connect(http, stack.proxy.data_url, tenant.key, f"model={PREVIEW_MODEL}")
    await receive_json(ws)
    started = time.monotonic()
    elapsed = await assert_ended(ws, "access_expired", started, 2.0 + 1.0 + ENDED_WITHIN_S)
    assert elapsed > 0.5  # not at once: at the expiry


async def test_a_client_that_vanishes_closes_the_upstream_side(
    stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    tenant = await granted(seed)
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.data_port)
    handshake = "".join(f"{k}: {v}\r\n" for k, v in UPGRADE_HEADERS.items())
    writer.write(
        (
            f"GET /v1/realtime?model={PREVIEW_MODEL} HTTP/1.1\r\nHost: x\r\n{handshake}"
            f"Authorization: Bearer {tenant.key}\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RECEIVE_S)
    assert head.startswith(b"HTTP/1.1 101"), head
    rid = next(
        line.split(b":", 1)[1].strip().decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"x-request-id:")
    )
    writer.transport.abort()  # no close frame, no FIN handshake: the peer is just gone

    async def upstream_closed() -> bool:
        found = await mock_sessions(http, stack.mock.url, rid)
        return bool(found) and found[0]["close_code"] is not None

    await wait_until(upstream_closed, timeout=RECEIVE_S)
