"""The data-plane handler: route → identify → snapshot → facts → decide → limit → forward.

One low-level aiohttp handler serves every path (no router, no middleware on the hot path). A
request reads the config snapshot once and uses it to the end. Every answer carries
``x-request-id``; every deny is built from the error table in ``proxy.errors``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import accesslog, identity, metrics
from proxy.config import Config
from proxy.dataplane import headers as hdrs
from proxy.dataplane.batches import upload_batch_file
from proxy.dataplane.client import UpstreamPool
from proxy.dataplane.forward import ForwardResult, UpstreamError, forward, read_answer, send
from proxy.dataplane.usage_stream import wants_usage_added, with_usage_asked
from proxy.errors import CODES, DEFAULT_BODIES, error_json
from proxy.metering import Meter
from proxy.policy import Decision, RequestInfo, decide, decide_models
from proxy.policy.facts import Facts
from proxy.snapshot import Holder, Snapshot
from proxy.store.batchfiles import BatchFiles, BatchFilesUnavailable
from proxy.store.cache import EntitlementUnavailable
from proxy.store.entitlements import Entitlements
from proxy.surfaces import BodyError, Named, named_models
from proxy.surfaces.errors import invalid, too_large

log = logging.getLogger(__name__)

_JSON = "application/json"
_VERIFIED_MAX = 100_000


@dataclass(slots=True)
class Admission:
    """The answer of the checks after the decision (category, rate limit)."""

    refused_code: str | None = None
    refused: web.StreamResponse | None = None
    headers: Mapping[str, str] | None = None  # set on the response before its first byte
    # Run when the request ends; what it returns (the Redis part, if any) runs in the background.
    release: Callable[[], Awaitable[None] | None] | None = None
    on_tokens: Callable[[int], None] | None = None  # the metered tokens of the answer


ADMITTED = Admission()


class WebSocketHook(Protocol):
    """What the handler needs for a WebSocket upgrade (``proxy.dataplane.websocket``)."""

    async def relay(
        self, ex: Exchange, out_headers: CIMultiDict[str], count: Callable[[str], None]
    ) -> web.StreamResponse: ...


@dataclass(slots=True)
class Hooks:
    """Steps other rooms plug in around forwarding (rate limits, classifier, misuse flags,
    WebSocket sessions)."""

    admit: Callable[[Snapshot, Facts, Decision, bytes, str], Awaitable[Admission]] | None = None
    on_upstream_headers: Callable[[Snapshot, Facts, CIMultiDictProxy[str]], None] | None = None
    websocket: WebSocketHook | None = None


def deny_response(
    code: str,
    rid: str,
    message: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A refusal in the OpenAI error shape, from the error table."""
    body = DEFAULT_BODIES[code] if message is None else error_json(code, message)
    h = {"x-request-id": rid, "content-type": _JSON}
    if headers:
        h.update(headers)
    return web.Response(status=CODES[code].status, body=body, headers=h)


_RID_PREFIX = secrets.token_hex(4)
_rid_seq = itertools.count(1)


def new_request_id() -> str:
    """Unique per process start (random prefix) and per request (sequence): no syscall."""
    return f"{_RID_PREFIX}{next(_rid_seq):08x}"


def presented_key(request: web.BaseRequest) -> str | None:
    auth = request.headers.get("authorization")
    if auth is not None:
        scheme, _, value = auth.partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else None
    key = request.headers.get("api-key")
    if key is None and "sec-websocket-protocol" in request.headers:
        return hdrs.subprotocol_key(request.headers)
    return key


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The whole body, refusing early (by content-length) or as soon as it passes ``limit``."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise too_large(limit)
    if not request.body_exists:
        return b""
    if declared is not None:
        content = request.content
        arrived = content.read_nowait(declared)  # usually all of it: no wait
        if len(arrived) == declared:
            return arrived
        try:
            return arrived + await content.readexactly(declared - len(arrived))
        except asyncio.IncompleteReadError:
            raise invalid("The request body ended early.") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass(slots=True)
class Exchange:
    """One request on its way through the data plane, like uvicorn's per-request cycle: what it
    arrived with, the config snapshot it is decided under (read once, at its start) and what each
    step learned. The steps after identification take it instead of argument lists."""

    request: web.BaseRequest
    snap: Snapshot
    rid: str
    started: float  # perf_counter() at arrival
    product: str
    upstream: str  # the route's upstream
    upstream_path: str  # the path as the upstream sees it (prefix rewritten), still encoded
    query: str
    facts: Facts
    program: str = "none"  # the metrics label, once decided
    body: bytes = b""
    named: Named | None = None  # where the request names its models (None: unreadable body)
    models: tuple[str, ...] = ()
    response_headers: dict[str, str] = field(default_factory=dict)  # added to the answer

    @property
    def cfg(self) -> Config:
        return self.snap.config

    @property
    def url_path(self) -> str:
        """The upstream path with the client's query string, as sent upstream."""
        query = self.request.rel_url.raw_query_string
        return self.upstream_path + ("?" + query if query else "")

    def upstream_headers(self) -> CIMultiDict[str]:
        """The request headers for the upstream: hop-by-hop and identity claims dropped, its
        credential and the forwarding headers added (SPEC §3.5)."""
        request = self.request
        return hdrs.upstream_request_headers(
            request.headers,
            peer=request.remote,
            trusted_proxies=self.cfg.trusted_proxies,
            upstream_api_key=self.snap.upstream_keys.get(self.upstream),
            request_id=self.rid,
            host=request.host,
        )


class DataPlane:
    def __init__(
        self,
        holder: Holder,
        entitlements: Entitlements,
        peppers: identity.Peppers,
        pool: UpstreamPool,
        hooks: Hooks | None = None,
        meter: Meter | None = None,
        batch_files: BatchFiles | None = None,
        access_log: accesslog.AccessLog | None = None,
    ) -> None:
        self.holder = holder
        self.access_log = access_log
        self.entitlements = entitlements
        self.peppers = peppers
        self.pool = pool
        self.hooks = hooks or Hooks()
        self.meter = meter
        self.batch_files = batch_files
        self._requests: dict[tuple[str, str, str], metrics.Counts] = {}
        self._durations: dict[str, metrics.Observes] = {}
        self._ttfb: dict[str, metrics.Observes] = {}
        self._decision = metrics.spread(metrics.DECISION_DURATION)
        self._verified: dict[str, int] = {}
        self.inflight = 0  # read by the inflight gauge (see metrics.track_inflight)
        self._releases: set[asyncio.Future[None]] = set()

    # ------------------------------------------------------------------ accounting

    def _count(self, product: str, program: str, code: str, started: float) -> None:
        key = (product, program, code)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = metrics.tally(metrics.REQUESTS, *key)
        counter.inc()
        entry = accesslog.current.get()
        if entry is not None:
            entry.product, entry.program, entry.code = product, program, code
        hist = self._durations.get(product)
        if hist is None:
            hist = self._durations[product] = metrics.spread(metrics.REQUEST_DURATION, product)
        hist.observe(time.perf_counter() - started)

    # ------------------------------------------------------------------ the handler

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        entry = accesslog.Entry(time.time(), started)
        token = accesslog.current.set(entry)
        self.inflight += 1
        try:
            response = await self._handle(request, started)
        finally:
            self.inflight -= 1
            accesslog.current.reset(token)
        if self.access_log is not None and entry.code is not None:
            entry.status = response.status
            entry.duration_ms = (time.perf_counter() - started) * 1000
            self.access_log.submit(entry)
        if "upgrade" in request.headers and not isinstance(response, web.WebSocketResponse):
            # What follows an upgrade request on this connection is no longer HTTP to parse.
            response.force_close()
        return response

    def _answer(
        self,
        ex: Exchange,
        code: str,
        message: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        """Count a refusal of ``ex`` and build its answer from the error table."""
        self._count(ex.product, ex.program, code, ex.started)
        return deny_response(code, ex.rid, message, headers)

    async def _handle(self, request: web.BaseRequest, started: float) -> web.StreamResponse:
        snap = self.holder.current
        cfg = snap.config
        rid = new_request_id()
        path, _, query = request.raw_path.partition("?")
        entry = accesslog.current.get()
        if entry is not None:
            entry.request_id, entry.settings = rid, cfg.access_log

        # Row 1: route.
        host = request.host.split(":", 1)[0] if snap.host_routes and request.host else None
        route = cfg.route_for(path, host)
        if route is None:
            self._count("none", "none", "unknown_route", started)
            return deny_response("unknown_route", rid)
        upstream_path = path
        if route.rewrite_prefix is not None:
            upstream_path = route.rewrite_prefix + path[len(route.path_prefix) :]
        product = route.product

        smuggling = hdrs.smuggling_error(request)
        if smuggling is not None:
            self._count(product, "none", "invalid_request", started)
            return deny_response("invalid_request", rid, smuggling)

        # Row 2: key. Rows 3..11 come from the facts.
        try:
            facts = await self._identify(request, cfg)
        except EntitlementUnavailable:
            self._count(product, "none", "entitlement_unavailable", started)
            return deny_response("entitlement_unavailable", rid)
        if facts is None:
            self._count(product, "none", "invalid_api_key", started)
            return deny_response("invalid_api_key", rid)
        ex = Exchange(
            request, snap, rid, started, product, route.upstream, upstream_path, query, facts
        )
        ex.response_headers["x-request-id"] = rid
        if entry is not None:
            entry.org, entry.workspace = facts.workspace.org_id, facts.workspace.workspace_id
        return await self._decide(ex)

    async def _decide(self, ex: Exchange) -> web.StreamResponse:
        """Rows 3 to 11: read what the request names, decide, admit, then forward or relay."""
        websocket = self.hooks.websocket if hdrs.is_websocket_upgrade(ex.request) else None
        body_error: BodyError | None = None
        try:
            await self._read_request(ex, websocket is not None)
        except BodyError as exc:
            body_error = exc
        except BatchFilesUnavailable:
            return self._answer(ex, "entitlement_unavailable")
        entry = accesslog.current.get()
        if entry is not None:
            entry.model = ex.models[0] if ex.models else None

        error = (body_error.code, body_error.message) if body_error else (None, None)
        decision = decide_models(ex.facts, ex.cfg, ex.product, ex.models, time.time(), *error)
        self._decision.observe(time.perf_counter() - ex.started)
        ex.program = decision.program.name if decision.program is not None else "none"
        for rule in decision.shadow_rules:
            metrics.SHADOW_DECISIONS.labels(rule).inc()
        if decision.code is not None:
            extra = None
            if decision.retry_after is not None:
                extra = {"retry-after": str(int(decision.retry_after))}
            message = body_error.message if body_error and decision.code == error[0] else None
            return self._answer(ex, decision.code, message, extra)

        admission = ADMITTED
        if self.hooks.admit is not None:
            named = ex.named  # the classifier reads a compressed body decoded, as the decision did
            seen = named.decoded if named is not None and named.encoded else ex.body
            admission = await self.hooks.admit(ex.snap, ex.facts, decision, seen, ex.rid)
            if admission.refused is not None:
                self._count(ex.product, ex.program, admission.refused_code or "refused", ex.started)
                return admission.refused
            if admission.headers:
                ex.response_headers.update(admission.headers)
        try:
            if websocket is not None:
                return await self._relay_websocket(ex, websocket)
            return await self._forward(ex, admission.on_tokens)
        finally:
            if admission.release is not None:
                pending = admission.release()
                if pending is not None:
                    # In the background: the answer is not held back for it, and a client
                    # disconnect (which cancels the handler) does not cancel it.
                    task = asyncio.ensure_future(pending)
                    self._releases.add(task)
                    task.add_done_callback(self._releases.discard)

    async def _read_request(self, ex: Exchange, websocket: bool) -> None:
        """Row 4: the body and every model the request names (``BodyError`` when unreadable)."""
        limit = ex.cfg.limits.max_body_bytes
        request = ex.request
        ex.body = await read_body(request, limit)
        headers = request.headers
        ex.named = named_models(
            request.method,
            ex.upstream_path,
            ex.query,
            headers.getall("content-type", ()),
            headers.getall("content-encoding", ()),
            ex.body,
            limit,
        )
        ex.models = ex.named.models
        if websocket and not ex.models:
            raise invalid("A WebSocket session must name its model: ?model=...")
        if ex.named.input_file_id is not None:
            ex.models = await self._batch_input_models(ex.named.input_file_id)

    async def _batch_input_models(self, file_id: str) -> tuple[str, ...]:
        """The models recorded for a batch's input file; a file never seen → 400."""
        recorded = None
        if self.batch_files is not None:
            recorded = await self.batch_files.models_of(file_id)
        if recorded is None:
            raise invalid(
                f"The input file {file_id!r} was not uploaded through this proxy with purpose "
                "batch; upload it with POST /v1/files."
            )
        return recorded

    async def _identify(self, request: web.BaseRequest, cfg: Config) -> Facts | None:
        key = presented_key(request)
        if not key:
            return None
        key_id = identity.key_id_of(key)
        if key_id is None:
            return None
        entry = accesslog.current.get()
        if entry is not None:
            entry.key_id = key_id  # the key's public id, never the key
        rec = await self.entitlements.key(key_id, cfg.cache)
        if rec is None or rec.revoked:
            return None
        # A key verified before skips the HMAC when it hashes (SipHash, keyed per process) to
        # the value remembered for its id; a record's digest never changes, only ``revoked``.
        if self._verified.get(key_id) != hash(key):
            if not identity.verify(self.peppers, key, rec.digest, rec.pepper_version):
                return None
            if len(self._verified) >= _VERIFIED_MAX:
                self._verified.clear()
            self._verified[key_id] = hash(key)
        return await self.entitlements.facts_for(rec.workspace_id, cfg.cache)

    async def _relay_websocket(self, ex: Exchange, websocket: WebSocketHook) -> web.StreamResponse:
        """An allowed upgrade: the session runs (holding its slot) until either side closes."""
        return await websocket.relay(
            ex,
            ex.upstream_headers(),
            lambda code: self._count(ex.product, ex.program, code, ex.started),
        )

    async def _forward(
        self, ex: Exchange, on_tokens: Callable[[int], None] | None
    ) -> web.StreamResponse:
        named = ex.named
        assert named is not None  # a body error was refused before
        # After the classifier, which saw the client's body as sent. A compressed body is sent
        # on rewritten and uncompressed (its Content-Encoding dropped below).
        hide_usage = False
        method = ex.request.method
        if self.meter is not None and wants_usage_added(method, ex.upstream_path, named.doc):
            asked = with_usage_asked(ex.body, named.doc, reserialize=named.encoded)
            if asked is not None:
                ex.body, hide_usage = asked, True
        out_headers = ex.upstream_headers()
        if hide_usage and named.encoded:
            out_headers.popall("Content-Encoding", None)
        if named.endpoint.kind == "model_list":
            return await self._models(ex, out_headers)
        if named.batch_file and self.batch_files is not None:
            return await self._upload_batch_file(ex, out_headers, self.batch_files)

        on_headers: Callable[[CIMultiDictProxy[str]], None] | None = None
        if self.hooks.on_upstream_headers is not None:
            hook, snap, facts = self.hooks.on_upstream_headers, ex.snap, ex.facts

            def on_headers(h: CIMultiDictProxy[str]) -> None:
                hook(snap, facts, h)

        try:
            result = await forward(
                ex.request,
                pool=self.pool,
                upstream=ex.cfg.upstreams[ex.upstream],
                url_path=ex.url_path,
                body=ex.body,
                headers=out_headers,
                extra_response_headers=ex.response_headers,
                strip_response_headers=ex.snap.strip_response_headers,
                on_upstream_headers=on_headers,
                hide_usage=hide_usage,
            )
        except asyncio.CancelledError:
            # The client went away (aiohttp cancels the handler): the request had gone upstream.
            if self.meter is not None:
                self.meter.unmetered(ex.program, "incomplete")
            raise
        except UpstreamError as exc:
            if exc.answered and self.meter is not None:
                self.meter.unmetered(ex.program, "incomplete")
            return self._answer(ex, exc.code)
        self._answered(ex, result, on_tokens)
        return result.response

    def _answered(
        self, ex: Exchange, result: ForwardResult, on_tokens: Callable[[int], None] | None
    ) -> None:
        """Account for a forwarded answer: its time to first byte, its usage and its count."""
        ttfb = self._ttfb.get(ex.upstream)
        if ttfb is None:
            ttfb = self._ttfb[ex.upstream] = metrics.spread(metrics.UPSTREAM_TTFB, ex.upstream)
        ttfb.observe(result.ttfb_seconds)
        entry = accesslog.current.get()
        if entry is not None:
            entry.ttfb_ms, entry.upstream_status = result.ttfb_seconds * 1000, result.status
        if self.meter is not None:
            # No I/O here: the write to Redis is queued; the client's bytes are already out
            # (a small body goes out when this returns, after one JSON parse).
            model = ex.models[0] if ex.models else None
            ws = ex.facts.workspace.workspace_id
            pricing = ex.cfg.pricing
            usage = self.meter.record(ws, ex.program, ex.product, model, result, pricing)
            if usage is not None and on_tokens is not None:
                on_tokens(usage.prompt + usage.output)
            if usage is not None and entry is not None:
                entry.tokens = dict(usage.kinds())
        self._count(ex.product, ex.program, "ok", ex.started)

    async def _upload_batch_file(
        self, ex: Exchange, out_headers: CIMultiDict[str], store: BatchFiles
    ) -> web.StreamResponse:
        """A batch input file: forwarded, and its models recorded for the batch that names it."""
        assert ex.named is not None
        try:
            response = await upload_batch_file(
                method=ex.request.method,
                pool=self.pool,
                upstream=ex.cfg.upstreams[ex.upstream],
                url_path=ex.url_path,
                body=ex.body,
                headers=out_headers,
                extra_response_headers=ex.response_headers,
                strip_response_headers=ex.snap.strip_response_headers,
                store=store,
                models=ex.named.models,
                workspace=ex.facts.workspace.workspace_id,
            )
        except UpstreamError as exc:
            return self._answer(ex, exc.code)
        except BatchFilesUnavailable:
            return self._answer(
                ex,
                "entitlement_unavailable",
                "The batch file was uploaded but could not be recorded; upload it again.",
            )
        self._count(ex.product, ex.program, "ok", ex.started)
        return response

    async def _models(self, ex: Exchange, out_headers: CIMultiDict[str]) -> web.StreamResponse:
        """GET /v1/models: the upstream's list filtered to what the caller may use now."""
        cfg = ex.cfg
        upstream = cfg.upstreams[ex.upstream]
        ex.program = "none"
        try:
            answer = await send(self.pool, upstream, "GET", ex.url_path, out_headers, b"")
            raw = await read_answer(answer)
            status = answer.status
        except UpstreamError as exc:
            return self._answer(ex, exc.code)
        entry = accesslog.current.get()
        if entry is not None:
            entry.upstream_status = status
        if status != 200:
            self._count(ex.product, "none", "ok", ex.started)
            return web.Response(status=status, body=raw, headers={"x-request-id": ex.rid})
        try:
            doc = json.loads(raw)
            items = doc["data"]
        except (ValueError, KeyError, TypeError):
            return self._answer(ex, "upstream_unavailable", "The model list is not valid JSON.")
        now, product, facts = time.time(), ex.product, ex.facts
        doc["data"] = [
            item
            for item in items
            if isinstance(item, dict)
            and isinstance(item.get("id"), str)
            and decide(facts, cfg, RequestInfo(product, item["id"]), now).allowed
        ]
        self._count(product, "none", "ok", ex.started)
        return web.Response(
            status=200,
            body=json.dumps(doc).encode(),
            headers={"x-request-id": ex.rid, "content-type": _JSON},
        )
