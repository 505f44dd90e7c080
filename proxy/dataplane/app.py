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
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import accesslog, identity, metrics
from proxy.dataplane import headers as hdrs
from proxy.dataplane.batches import upload_batch_file
from proxy.dataplane.forward import UpstreamError, client_timeout, forward
from proxy.dataplane.usage_stream import wants_usage_added, with_usage_asked
from proxy.errors import CODES, DEFAULT_BODIES, error_json
from proxy.metering import Meter
from proxy.policy import Decision, RequestInfo, decide, decide_models
from proxy.policy.facts import Facts
from proxy.snapshot import Holder, Snapshot
from proxy.store.batchfiles import BatchFiles, BatchFilesUnavailable
from proxy.store.cache import EntitlementUnavailable
from proxy.store.entitlements import Entitlements
from proxy.surfaces import BodyError as BodyError  # re-exported for the WebSocket room
from proxy.surfaces import Named, named_models
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
    release: Callable[[], Awaitable[None]] | None = None  # run when the request ends
    on_tokens: Callable[[int], None] | None = None  # the metered tokens of the answer


ADMITTED = Admission()


class WebSocketHook(Protocol):
    """What the handler needs for a WebSocket upgrade (``proxy.dataplane.websocket``)."""

    def model_of(self, request: web.BaseRequest) -> str | None: ...

    async def relay(
        self,
        request: web.BaseRequest,
        snap: Snapshot,
        upstream_name: str,
        url_path: str,
        out_headers: CIMultiDict[str],
        workspace_id: str,
        org_id: str,
        model: str,
        product: str,
        rid: str,
        count: Callable[[str], None],
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
        try:
            return await request.content.readexactly(declared)
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


class DataPlane:
    def __init__(
        self,
        holder: Holder,
        entitlements: Entitlements,
        peppers: identity.Peppers,
        session: aiohttp.ClientSession,
        hooks: Hooks | None = None,
        meter: Meter | None = None,
        batch_files: BatchFiles | None = None,
        access_log: accesslog.AccessLog | None = None,
    ) -> None:
        self.holder = holder
        self.access_log = access_log
        self.entitlements = entitlements
        self.peppers = peppers
        self.session = session
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
        if entry is not None:
            entry.org, entry.workspace = facts.workspace.org_id, facts.workspace.workspace_id

        upstream_path = path
        if route.rewrite_prefix is not None:
            upstream_path = route.rewrite_prefix + path[len(route.path_prefix) :]

        websocket = self.hooks.websocket if hdrs.is_websocket_upgrade(request) else None
        body = b""
        named: Named | None = None
        models: tuple[str, ...] = ()
        body_error: BodyError | None = None
        try:
            body = await read_body(request, cfg.limits.max_body_bytes)
            headers = request.headers
            named = named_models(
                request.method,
                upstream_path,
                query,
                headers.getall("content-type", ()),
                headers.getall("content-encoding", ()),
                body,
                cfg.limits.max_body_bytes,
            )
            models = named.models
            if websocket is not None:
                websocket.model_of(request)  # a session must name its model
            if named.input_file_id is not None:
                models = await self._batch_input_models(named.input_file_id)
        except BodyError as exc:
            body_error = exc
        except BatchFilesUnavailable:
            self._count(product, "none", "entitlement_unavailable", started)
            return deny_response("entitlement_unavailable", rid)
        if entry is not None:
            entry.model = models[0] if models else None

        decision = decide_models(
            facts,
            cfg,
            product,
            models,
            time.time(),
            body_error.code if body_error else None,
            body_error.message if body_error else None,
        )
        self._decision.observe(time.perf_counter() - started)
        program = decision.program.name if decision.program is not None else "none"
        for rule in decision.shadow_rules:
            metrics.SHADOW_DECISIONS.labels(rule).inc()
        if decision.code is not None:
            self._count(product, program, decision.code, started)
            extra = None
            if decision.retry_after is not None:
                extra = {"retry-after": str(int(decision.retry_after))}
            message = (
                body_error.message if body_error and decision.code == body_error.code else None
            )
            return deny_response(decision.code, rid, message, extra)

        assert named is not None  # a body error was refused above
        response_headers: dict[str, str] = {"x-request-id": rid}
        admission = ADMITTED
        if self.hooks.admit is not None:
            admission = await self.hooks.admit(
                snap, facts, decision, named.decoded if named.encoded else body, rid
            )
            if admission.refused is not None:
                self._count(product, program, admission.refused_code or "refused", started)
                return admission.refused
            if admission.headers:
                response_headers.update(admission.headers)
        # After the classifier, which saw the client's body as sent. A compressed body is sent
        # on rewritten and uncompressed (its Content-Encoding dropped in _forward).
        hide_usage = False
        if self.meter is not None and wants_usage_added(request.method, upstream_path, named.doc):
            asked = with_usage_asked(body, named.doc, reserialize=named.encoded)
            if asked is not None:
                body, hide_usage = asked, True
        try:
            if websocket is not None:
                return await self._relay_websocket(
                    websocket,
                    request,
                    snap,
                    route.upstream,
                    upstream_path,
                    rid,
                    facts,
                    models[0] if models else None,
                    product,
                    program,
                    started,
                )
            return await self._forward(
                request,
                snap,
                route.upstream,
                upstream_path,
                body,
                rid,
                response_headers,
                facts,
                named,
                product,
                program,
                started,
                hide_usage,
                hide_usage and named.encoded,
                admission.on_tokens,
            )
        finally:
            if admission.release is not None:
                # In the background: the answer is not held back for it, and a client
                # disconnect (which cancels the handler) does not cancel it.
                task = asyncio.ensure_future(admission.release())
                self._releases.add(task)
                task.add_done_callback(self._releases.discard)

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

    async def _identify(self, request: web.BaseRequest, cfg: Any) -> Facts | None:
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

    async def _relay_websocket(
        self,
        websocket: WebSocketHook,
        request: web.BaseRequest,
        snap: Snapshot,
        upstream_name: str,
        upstream_path: str,
        rid: str,
        facts: Facts,
        model: str | None,
        product: str,
        program: str,
        started: float,
    ) -> web.StreamResponse:
        """An allowed upgrade: the session runs (holding its slot) until either side closes."""
        assert model is not None  # model_of refuses an upgrade that names none
        query = request.rel_url.raw_query_string
        out_headers = hdrs.upstream_request_headers(
            request.headers,
            peer=request.remote,
            trusted_proxies=snap.config.trusted_proxies,
            upstream_api_key=snap.upstream_keys.get(upstream_name),
            request_id=rid,
            host=request.host,
        )
        return await websocket.relay(
            request,
            snap,
            upstream_name,
            upstream_path + ("?" + query if query else ""),
            out_headers,
            facts.workspace.workspace_id,
            facts.workspace.org_id,
            model,
            product,
            rid,
            lambda code: self._count(product, program, code, started),
        )

    async def _forward(
        self,
        request: web.BaseRequest,
        snap: Snapshot,
        upstream_name: str,
        upstream_path: str,
        body: bytes,
        rid: str,
        response_headers: dict[str, str],
        facts: Facts,
        named: Named,
        product: str,
        program: str,
        started: float,
        hide_usage: bool,
        body_decoded: bool,
        on_tokens: Callable[[int], None] | None,
    ) -> web.StreamResponse:
        cfg = snap.config
        upstream = cfg.upstreams[upstream_name]
        query = request.rel_url.raw_query_string
        url_path = upstream_path + ("?" + query if query else "")
        out_headers = hdrs.upstream_request_headers(
            request.headers,
            peer=request.remote,
            trusted_proxies=cfg.trusted_proxies,
            upstream_api_key=snap.upstream_keys.get(upstream_name),
            request_id=rid,
            host=request.host,
        )
        if body_decoded:
            out_headers.popall("Content-Encoding", None)
        if named.endpoint.kind == "model_list":
            return await self._models(
                snap, upstream_name, url_path, out_headers, facts, product, rid, started
            )

        if named.batch_file and self.batch_files is not None:
            try:
                response = await upload_batch_file(
                    method=request.method,
                    session=self.session,
                    upstream=upstream,
                    url_path=url_path,
                    body=body,
                    headers=out_headers,
                    extra_response_headers=response_headers,
                    strip_response_headers=snap.strip_response_headers,
                    store=self.batch_files,
                    models=named.models,
                    workspace=facts.workspace.workspace_id,
                )
            except UpstreamError as exc:
                self._count(product, program, exc.code, started)
                return deny_response(exc.code, rid)
            except BatchFilesUnavailable:
                self._count(product, program, "entitlement_unavailable", started)
                return deny_response(
                    "entitlement_unavailable",
                    rid,
                    "The batch file was uploaded but could not be recorded; upload it again.",
                )
            self._count(product, program, "ok", started)
            return response

        on_headers: Callable[[CIMultiDictProxy[str]], None] | None = None
        if self.hooks.on_upstream_headers is not None:
            hook = self.hooks.on_upstream_headers

            def on_headers(h: CIMultiDictProxy[str]) -> None:
                hook(snap, facts, h)

        try:
            result = await forward(
                request,
                session=self.session,
                upstream=upstream,
                url_path=url_path,
                body=body,
                headers=out_headers,
                extra_response_headers=response_headers,
                strip_response_headers=snap.strip_response_headers,
                on_upstream_headers=on_headers,
                hide_usage=hide_usage,
            )
        except asyncio.CancelledError:
            # The client went away (aiohttp cancels the handler): the request had gone upstream.
            if self.meter is not None:
                self.meter.unmetered(program, "incomplete")
            raise
        except UpstreamError as exc:
            if exc.answered and self.meter is not None:
                self.meter.unmetered(program, "incomplete")
            self._count(product, program, exc.code, started)
            return deny_response(exc.code, rid)
        model = named.models[0] if named.models else None
        ttfb = self._ttfb.get(upstream_name)
        if ttfb is None:
            ttfb = self._ttfb[upstream_name] = metrics.spread(metrics.UPSTREAM_TTFB, upstream_name)
        ttfb.observe(result.ttfb_seconds)
        entry = accesslog.current.get()
        if entry is not None:
            entry.ttfb_ms, entry.upstream_status = result.ttfb_seconds * 1000, result.status
        if self.meter is not None:
            # No I/O here: the write to Redis is queued; the client's bytes are already out
            # (a small body goes out when this returns, after one JSON parse).
            usage = self.meter.record(
                facts.workspace.workspace_id, program, product, model, result, cfg.pricing
            )
            if usage is not None and on_tokens is not None:
                on_tokens(usage.prompt + usage.output)
            if usage is not None and entry is not None:
                entry.tokens = dict(usage.kinds())
        self._count(product, program, "ok", started)
        return result.response

    async def _models(
        self,
        snap: Snapshot,
        upstream_name: str,
        url_path: str,
        out_headers: Any,
        facts: Facts,
        product: str,
        rid: str,
        started: float,
    ) -> web.StreamResponse:
        """GET /v1/models: the upstream's list filtered to what the caller may use now."""
        cfg = snap.config
        upstream = cfg.upstreams[upstream_name]
        try:
            async with self.session.get(
                upstream.url + url_path,
                headers=out_headers,
                timeout=client_timeout(upstream.timeouts),
            ) as resp:
                raw = await resp.read()
                status = resp.status
            entry = accesslog.current.get()
            if entry is not None:
                entry.upstream_status = status
        except TimeoutError:
            self._count(product, "none", "upstream_timeout", started)
            return deny_response("upstream_timeout", rid)
        except aiohttp.ClientError:
            self._count(product, "none", "upstream_unavailable", started)
            return deny_response("upstream_unavailable", rid)
        if status != 200:
            self._count(product, "none", "ok", started)
            return web.Response(status=status, body=raw, headers={"x-request-id": rid})
        try:
            doc = json.loads(raw)
            items = doc["data"]
        except (ValueError, KeyError, TypeError):
            self._count(product, "none", "upstream_unavailable", started)
            return deny_response("upstream_unavailable", rid, "The model list is not valid JSON.")
        now = time.time()
        doc["data"] = [
            item
            for item in items
            if isinstance(item, dict)
            and isinstance(item.get("id"), str)
            and decide(facts, cfg, RequestInfo(product, item["id"]), now).allowed
        ]
        self._count(product, "none", "ok", started)
        return web.Response(
            status=200,
            body=json.dumps(doc).encode(),
            headers={"x-request-id": rid, "content-type": _JSON},
        )
