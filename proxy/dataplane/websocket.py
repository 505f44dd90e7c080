"""WebSocket sessions: the Realtime API (SPEC §3.3, §3.4, §3.5).

An upgrade is decided by the handler like any request (route, key, facts, ``decide()``, rate
limit and concurrency slot), with the model read from the query string by ``proxy.surfaces``
(an upgrade that names none is refused); a refusal is answered before the upgrade with the same
status and body.
An allowed upgrade comes here: the proxy opens its own WebSocket to the upstream (same header and
credential rules as HTTP forwarding), then upgrades the client and relays every message both
ways, pings, pongs and close codes included, until either side closes. The session holds its
concurrency slot until then.

While a session is open its access is decided again, with the same ``decide()``:

- on every client event that names a model (``model``, ``session.model``, ``response.model``)
  before it is forwarded;
- when the invalidation signal evicts a cached fact the session stands on (its key, workspace,
  org, grants or standing), so a revocation or suspension ends it within the propagation target;
- when the config snapshot is swapped (a phase flipped to ``closed``);
- every ``cache.ttl_seconds / 5`` (at most every second) with facts read no longer than the
  TTL ago, so a lost invalidation message or a grant's ``expires_at`` still ends it in time.

A session whose access ended gets an ``error`` event carrying the §3.4 code, then close 1008.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from proxy import identity, metrics
from proxy.background import Task, every
from proxy.config import CacheConfig
from proxy.dataplane import headers as hdrs
from proxy.dataplane.app import Exchange, deny_response, presented_key
from proxy.dataplane.forward import UpstreamError, upstream_errors
from proxy.errors import error_payload
from proxy.modelnames import normalize
from proxy.policy import RequestInfo, decide
from proxy.snapshot import Holder
from proxy.store import schema
from proxy.store.cache import EntitlementUnavailable
from proxy.store.entitlements import Entitlements
from proxy.surfaces import BodyError, jsonbody

log = logging.getLogger(__name__)

POLICY_CLOSE = 1008  # RFC 6455: policy violation
TRY_AGAIN_CLOSE = 1013  # RFC 6455: try again later (facts unavailable)
_MAX_SWEEP_S = 1.0
_CLOSE_TIMEOUT_S = 5.0
# Close codes that name a state, not a code a peer may send (RFC 6455 §7.4.1).
_UNSENDABLE = {1004: 1000, 1005: 1000, 1006: 1011, 1015: 1011}
_SUBPROTOCOL_KEY = hdrs.SUBPROTOCOL_KEY_PREFIX


# ---------------------------------------------------------------------------- reading models


_Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse  # either end of a session


def event_models(data: str | bytes, *, binary: bool) -> tuple[str, ...] | None:
    """The models a client event names (its ``model``, ``session.model``, ``response.model``),
    as spelled; ``None`` for a binary frame that is not JSON (relayed as it is).

    Raises :class:`BodyError` for a text frame that is not a JSON object, for duplicate keys
    anywhere in an event (another reader may keep the other one), for nesting deeper than the
    surfaces allow, and for a ``model`` that is not a string. ``null`` or ``""`` names nothing.
    """
    raw = data.encode() if isinstance(data, str) else data
    if binary:
        try:
            json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
    doc = jsonbody.loads(raw, strict=True)
    if not isinstance(doc, dict):
        if binary:
            return None
        raise BodyError("invalid_request", "The event is not a JSON object.")
    models: list[str] = []
    for where, holder in (("model", doc), ("session.model", doc.get("session"))):
        if isinstance(holder, dict) and "model" in holder:
            name = jsonbody.model_value(holder["model"], where)
            if name is not None:
                models.append(name)
    response = doc.get("response")
    if isinstance(response, dict) and "model" in response:
        name = jsonbody.model_value(response["model"], "response.model")
        if name is not None:
            models.append(name)
    return tuple(models)


def error_event(code: str, message: str | None = None, event_id: Any = None) -> str:
    """A Realtime API ``error`` event in the OpenAI error shape."""
    error = error_payload(code, message)["error"]
    error["event_id"] = event_id if isinstance(event_id, str) else None
    return json.dumps({"type": "error", "error": error})


def _sendable(code: int | None) -> int:
    """A close code this side may send for the one the other side sent (or its state)."""
    if code is None or code in (0, 1005):
        return 1000
    if code in _UNSENDABLE:
        return _UNSENDABLE[code]
    return code if 1000 <= code <= 1014 or 3000 <= code <= 4999 else 1000


def _upstream_headers(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """The HTTP forwarding headers less the client's handshake: the client library makes its
    own (key, version, extensions) and the subprotocols are passed on separately."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if not name.lower().startswith("sec-websocket-"):
            out.add(name, value)
    return out


def offered_protocols(request: web.BaseRequest) -> list[str]:
    """The client's subprotocols, less any that carries a key: that never goes upstream."""
    out: list[str] = []
    for value in request.headers.getall("sec-websocket-protocol", []):
        for proto in value.split(","):
            proto = proto.strip()
            if proto and not proto.lower().startswith(_SUBPROTOCOL_KEY):
                out.append(proto)
    return out


# ---------------------------------------------------------------------------- one session


@dataclass(eq=False)
class Session:
    key_id: str
    workspace_id: str
    org_id: str
    product: str
    model: str
    client: web.WebSocketResponse
    upstream: aiohttp.ClientWebSocketResponse
    reason: str | None = None  # why it ended (set once)
    recheck: asyncio.Task[None] | None = None
    dirty: bool = False  # a signal arrived since the running recheck read its facts
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def closed_by(self, side: str) -> None:
        """A side closed on its own (no decision ended it)."""
        if self.reason is None:
            self.reason = side
            self.ended.set()

    def cache_keys(self) -> tuple[str, ...]:
        """The cached facts this session's access stands on."""
        return (
            schema.c_key(self.key_id),
            schema.c_ws(self.workspace_id),
            schema.c_org(self.org_id),
            schema.c_grants("workspace:" + self.workspace_id),
            schema.c_grants("org:" + self.org_id),
            schema.c_standing(self.workspace_id),
        )


class Sessions:
    """The open sessions of this process; plugged into the handler as ``Hooks.websocket``."""

    def __init__(
        self, holder: Holder, entitlements: Entitlements, session: aiohttp.ClientSession
    ) -> None:
        self.holder = holder
        self.entitlements = entitlements
        self.session = session
        self.open: set[Session] = set()
        self._by_fact: dict[str, set[Session]] = {}
        self._sweeper = Task(
            "websocket-sweep", lambda: every(self._sweep_period, self._sweep, "websocket sweep")
        )
        self._gauges: dict[str, Any] = {}
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._sweeper.start()

    async def stop(self) -> None:
        """End every open session (close 1001, going away), and any opened from now on."""
        self._stopping = True
        await self._sweeper.stop()
        await asyncio.gather(
            *(self._end(s, "shutdown", 1001, None) for s in list(self.open)),
            return_exceptions=True,
        )

    # ------------------------------------------------------------------ signals

    def facts_evicted(self, keys: Iterable[str] | None) -> None:
        """The invalidation signal: re-decide the sessions standing on ``keys`` (None: all)."""
        if keys is None:
            touched: Iterable[Session] = list(self.open)
        else:
            found: set[Session] = set()
            for key in keys:
                found |= self._by_fact.get(key, set())
            touched = found
        for s in touched:
            self._schedule(s)

    def config_swapped(self) -> None:
        """A new config snapshot (a phase may have closed): re-decide every session."""
        for s in list(self.open):
            self._schedule(s)

    def _schedule(self, s: Session) -> None:
        """Re-decide ``s`` soon; a recheck already running runs once more after it ends, so
        the facts it reads are never older than the signal."""
        if s.reason is not None:
            return
        s.dirty = True
        if s.recheck is None or s.recheck.done():
            s.recheck = asyncio.ensure_future(self._recheck_while_dirty(s))

    async def _recheck_while_dirty(self, s: Session) -> None:
        while s.dirty and s.reason is None:
            s.dirty = False
            await self._recheck(s, None)

    def _sweep_period(self) -> float:
        ttl = self.holder.current.config.cache.ttl_seconds
        return min(_MAX_SWEEP_S, max(0.05, ttl / 5))

    async def _sweep(self) -> None:
        if not self.open:
            return
        cc = self.holder.current.config.cache
        # Facts read at most ttl - period ago: with this period, none is older than the TTL.
        period = self._sweep_period()
        younger = dataclasses.replace(cc, ttl_seconds=max(0.0, cc.ttl_seconds - period))
        await asyncio.gather(
            *(self._recheck(s, younger) for s in list(self.open) if s.reason is None),
            return_exceptions=True,
        )

    # ------------------------------------------------------------------ deciding again

    async def _refusal(self, s: Session, model: str, cc: CacheConfig | None) -> str | None:
        """The §3.4 code that refuses ``model`` to this session now, or None when allowed."""
        snap = self.holder.current
        cfg = snap.config
        cache = cc or cfg.cache
        try:
            rec = await self.entitlements.key(s.key_id, cache)
            if rec is None or rec.revoked:
                return "invalid_api_key"
            facts = await self.entitlements.facts_for(s.workspace_id, cache)
        except EntitlementUnavailable:
            return "entitlement_unavailable"
        if facts is None:
            return "invalid_api_key"
        return decide(facts, cfg, RequestInfo(s.product, model), time.time()).code

    async def _recheck(self, s: Session, cc: CacheConfig | None) -> None:
        if s.reason is not None:
            return
        try:
            code = await self._refusal(s, s.model, cc)
        except Exception:
            log.exception("websocket session recheck failed")
            code = "entitlement_unavailable"
        if code is not None:
            await self._end_for(s, code, None)

    async def _end_for(self, s: Session, code: str, event_id: Any) -> None:
        close = TRY_AGAIN_CLOSE if code == "entitlement_unavailable" else POLICY_CLOSE
        await self._end(s, code, close, error_event(code, event_id=event_id))

    async def _end(self, s: Session, reason: str, close_code: int, event: str | None) -> None:
        """End ``s`` once: tell the client why, close both sides."""
        if s.reason is not None:
            return
        s.reason = reason
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                if event is not None and not s.client.closed:
                    await s.client.send_str(event)
                await s.client.close(code=close_code, message=reason.encode()[:120])
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await s.upstream.close(code=1000)
        s.ended.set()

    # ------------------------------------------------------------------ the handler's hook

    async def relay(
        self, ex: Exchange, out_headers: CIMultiDict[str], count: Callable[[str], None]
    ) -> web.StreamResponse:
        """Connect upstream, upgrade the client, relay until either side closes."""
        request, rid = ex.request, ex.rid
        if not web.WebSocketResponse().can_prepare(request).ok:
            count("invalid_request")
            return deny_response("invalid_request", rid, "Not a valid WebSocket handshake.")
        key_id = identity.key_id_of(presented_key(request) or "")
        if key_id is None:  # the handler identified this key a moment ago
            count("invalid_api_key")
            return deny_response("invalid_api_key", rid)
        try:
            upstream_ws = await self._connect(ex, out_headers)
        except UpstreamError as exc:
            count(exc.code)
            return deny_response(exc.code, rid, exc.client_message)

        client = web.WebSocketResponse(
            protocols=(upstream_ws.protocol,) if upstream_ws.protocol else (),
            autoping=False,
            autoclose=False,
            max_msg_size=ex.cfg.limits.max_body_bytes,
        )
        client.headers["x-request-id"] = rid
        ws = ex.facts.workspace
        model = ex.models[0]  # the handler refuses an upgrade that names no model
        s = Session(key_id, ws.workspace_id, ws.org_id, ex.product, model, client, upstream_ws)
        try:
            await client.prepare(request)
        except Exception:
            await upstream_ws.close(code=1001)
            raise
        count("ok")
        self._register(s)
        try:
            if self._stopping:  # upgraded while the listener drains
                await self._end(s, "shutdown", 1001, None)
            # A signal that arrived between the decision and now found no session to end:
            # decide once more (no Redis round trip while the facts are cached and fresh).
            self._schedule(s)
            await self._pump_both(s)
        finally:
            self._unregister(s)
        return client

    async def _connect(
        self, ex: Exchange, out_headers: CIMultiDict[str]
    ) -> aiohttp.ClientWebSocketResponse:
        """The upstream side of the session; ``UpstreamError`` when it cannot be opened."""
        upstream = ex.cfg.upstreams[ex.upstream]
        timeouts = upstream.timeouts
        with upstream_errors():
            try:
                async with asyncio.timeout(timeouts.connect_s + timeouts.first_byte_s):
                    return await self.session.ws_connect(
                        URL(upstream.url + ex.url_path, encoded=True),
                        headers=_upstream_headers(out_headers),
                        protocols=offered_protocols(ex.request),
                        autoping=False,
                        autoclose=False,
                        max_msg_size=0,
                        timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=_CLOSE_TIMEOUT_S),
                    )
            except aiohttp.WSServerHandshakeError as exc:
                message = f"The model service refused the WebSocket upgrade ({exc.status})."
                raise UpstreamError(
                    "upstream_unavailable", "upgrade refused", client_message=message
                ) from exc

    # ------------------------------------------------------------------ relaying

    def _register(self, s: Session) -> None:
        self.open.add(s)
        for key in s.cache_keys():
            self._by_fact.setdefault(key, set()).add(s)
        gauge = self._gauges.get(s.product)
        if gauge is None:
            gauge = self._gauges[s.product] = metrics.WEBSOCKET_SESSIONS.labels(s.product)
        gauge.inc()

    def _unregister(self, s: Session) -> None:
        self.open.discard(s)
        for key in s.cache_keys():
            holders = self._by_fact.get(key)
            if holders is not None:
                holders.discard(s)
                if not holders:
                    del self._by_fact[key]
        self._gauges[s.product].dec()
        metrics.WEBSOCKET_CLOSED.labels(s.product, s.reason or "client").inc()
        if s.recheck is not None and not s.recheck.done():
            s.recheck.cancel()

    async def _pump_both(self, s: Session) -> None:
        to_upstream = asyncio.create_task(self._from_client(s))
        to_client = asyncio.create_task(self._from_upstream(s))
        done: set[asyncio.Task[None]] = set()
        try:
            done, pending = await asyncio.wait(
                (to_upstream, to_client), return_when=asyncio.FIRST_COMPLETED
            )
            # The side that closed closes the other: give that its close handshake.
            if pending:
                await asyncio.wait(pending, timeout=_CLOSE_TIMEOUT_S)
            if s.reason is not None and not s.ended.is_set():
                # Ended by a decision: wait until the client was told and both sides closed.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2 * _CLOSE_TIMEOUT_S):
                        await s.ended.wait()
        finally:
            for task in (to_upstream, to_client):
                task.cancel()
            for task in (to_upstream, to_client):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            s.closed_by("upstream" if to_client in done else "client")
            with contextlib.suppress(Exception):
                await s.upstream.close(code=1001)
            with contextlib.suppress(Exception):
                await s.client.close(code=1001)

    async def _from_client(self, s: Session) -> None:
        await self._pump(s, s.client, s.upstream, "client")

    async def _from_upstream(self, s: Session) -> None:
        await self._pump(s, s.upstream, s.client, "upstream")

    async def _pump(self, s: Session, source: _Socket, sink: _Socket, side: str) -> None:
        """Relay frames from ``source`` to ``sink`` until either closes. A client's events are
        decided first; pings and close codes pass through; an upstream error closes 1011."""
        while True:
            msg = await source.receive()
            kind = msg.type
            if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                binary = kind is WSMsgType.BINARY
                if side == "client" and not await self._client_event_allowed(s, msg.data, binary):
                    if s.reason is not None:
                        return
                    continue
                await (sink.send_bytes(msg.data) if binary else sink.send_str(msg.data))
            elif kind is WSMsgType.PING:
                await sink.ping(msg.data)
            elif kind is WSMsgType.PONG:
                await sink.pong(msg.data)
            elif kind is WSMsgType.CLOSE:
                s.closed_by(side)
                await sink.close(code=_sendable(msg.data), message=_extra(msg.extra))
                await source.close(code=_sendable(msg.data))
                return
            else:  # CLOSING, CLOSED, ERROR
                if side == "upstream" and kind is WSMsgType.ERROR and s.reason is None:
                    s.closed_by("upstream_error")
                    await sink.close(code=1011)
                return

    async def _client_event_allowed(self, s: Session, data: str | bytes, binary: bool) -> bool:
        """Decide the models a client event names; a refusal ends the session."""
        try:
            models = event_models(data, binary=binary)
        except BodyError as exc:
            await s.client.send_str(error_event(exc.code, exc.message, _event_id(data)))
            return False
        if not models:
            return True
        for model in models:
            code = await self._refusal(s, model, None)
            if code is not None:
                await self._end_for(s, code, _event_id(data))
                return False
        if len({normalize(m) for m in models}) == 1 and normalize(models[0]) != normalize(s.model):
            s.model = models[0]  # later rechecks decide the model the session now runs
        return True


def _extra(extra: Any) -> bytes:
    if isinstance(extra, str):
        return extra.encode()[:120]
    return b""


def _event_id(data: str | bytes) -> Any:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return doc.get("event_id") if isinstance(doc, dict) else None
