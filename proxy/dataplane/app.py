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
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import identity, metrics
from proxy.dataplane import headers as hdrs
from proxy.dataplane.forward import UpstreamError, client_timeout, forward
from proxy.dataplane.usage_stream import wants_usage_added, with_usage_asked
from proxy.errors import CODES, DEFAULT_BODIES, error_json
from proxy.metering import Meter
from proxy.policy import Decision, RequestInfo, decide
from proxy.policy.facts import Facts
from proxy.snapshot import Holder, Snapshot
from proxy.store.cache import EntitlementUnavailable
from proxy.store.entitlements import Entitlements

log = logging.getLogger(__name__)

_JSON = "application/json"
_MODELS_PATH = "/v1/models"
_MODELS_PREFIX = "/v1/models/"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_VERIFIED_MAX = 100_000


class BodyError(Exception):
    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message


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


def _request_id() -> str:
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
        raise BodyError("request_too_large", f"The request body exceeds {limit} bytes.")
    if not request.body_exists:
        return b""
    if declared is not None:
        try:
            return await request.content.readexactly(declared)
        except asyncio.IncompleteReadError:
            raise BodyError("invalid_request", "The request body ended early.") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyError("request_too_large", f"The request body exceeds {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def model_of(
    method: str, upstream_path: str, body: bytes, content_type: str
) -> tuple[str | None, Any]:
    """The model a request names (the JSON body's ``model``, or the id in /v1/models/{id}) and
    the parsed body (None when not JSON)."""
    if method in _BODY_METHODS and (body or content_type == _JSON):
        if content_type not in ("", _JSON) and not content_type.endswith("+json"):
            return None, None  # multipart uploads and the like name no model
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise BodyError("invalid_request", "The request body is not valid JSON.") from None
        model = doc.get("model") if isinstance(doc, dict) else None
        if not isinstance(model, str) or not model:
            raise BodyError("invalid_request", "The request must name a model.")
        return model, doc
    if upstream_path.startswith(_MODELS_PREFIX) and method == "GET":
        return upstream_path[len(_MODELS_PREFIX) :].split("?", 1)[0] or None, None
    return None, None


class DataPlane:
    def __init__(
        self,
        holder: Holder,
        entitlements: Entitlements,
        peppers: identity.Peppers,
        session: aiohttp.ClientSession,
        hooks: Hooks | None = None,
        meter: Meter | None = None,
    ) -> None:
        self.holder = holder
        self.entitlements = entitlements
        self.peppers = peppers
        self.session = session
        self.hooks = hooks or Hooks()
        self.meter = meter
        self._requests: dict[tuple[str, str, str], Any] = {}
        self._durations: dict[str, Any] = {}
        self._ttfb: dict[str, Any] = {}
        self._verified: dict[str, int] = {}
        self.inflight = 0  # read by the inflight gauge (see metrics.track_inflight)
        self._releases: set[asyncio.Future[None]] = set()

    # ------------------------------------------------------------------ accounting

    def _count(self, product: str, program: str, code: str, started: float) -> None:
        key = (product, program, code)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = metrics.REQUESTS.labels(product, program, code)
        counter.inc()
        hist = self._durations.get(product)
        if hist is None:
            hist = self._durations[product] = metrics.REQUEST_DURATION.labels(product)
        hist.observe(time.perf_counter() - started)

    # ------------------------------------------------------------------ the handler

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        self.inflight += 1
        try:
            response = await self._handle(request, started)
        finally:
            self.inflight -= 1
        if "upgrade" in request.headers and not isinstance(response, web.WebSocketResponse):
            # What follows an upgrade request on this connection is no longer HTTP to parse.
            response.force_close()
        return response

    async def _handle(self, request: web.BaseRequest, started: float) -> web.StreamResponse:
        snap = self.holder.current
        cfg = snap.config
        rid = _request_id()
        path = request.raw_path.split("?", 1)[0]

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

        upstream_path = path
        if route.rewrite_prefix is not None:
            upstream_path = route.rewrite_prefix + path[len(route.path_prefix) :]

        websocket = self.hooks.websocket if hdrs.is_websocket_upgrade(request) else None
        body = b""
        model: str | None = None
        doc: Any = None
        body_error: BodyError | None = None
        try:
            body = await read_body(request, cfg.limits.max_body_bytes)
            if websocket is not None:
                model = websocket.model_of(request)
            else:
                model, doc = model_of(request.method, upstream_path, body, request.content_type)
        except BodyError as exc:
            body_error = exc

        decision = decide(
            facts,
            cfg,
            RequestInfo(
                product,
                model,
                body_error.code if body_error else None,
                body_error.message if body_error else None,
            ),
            time.time(),
        )
        metrics.DECISION_DURATION.observe(time.perf_counter() - started)
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

        response_headers: dict[str, str] = {"x-request-id": rid}
        admission = ADMITTED
        if self.hooks.admit is not None:
            admission = await self.hooks.admit(snap, facts, decision, body, rid)
            if admission.refused is not None:
                self._count(product, program, admission.refused_code or "refused", started)
                return admission.refused
            if admission.headers:
                response_headers.update(admission.headers)
        hide_usage = False  # the classifier (above) saw the client's body as sent
        if self.meter is not None and wants_usage_added(request.method, upstream_path, doc):
            asked = with_usage_asked(body, doc)
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
                    model,
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
                model,
                product,
                program,
                started,
                hide_usage,
                admission.on_tokens,
            )
        finally:
            if admission.release is not None:
                # In the background: the answer is not held back for it, and a client
                # disconnect (which cancels the handler) does not cancel it.
                task = asyncio.ensure_future(admission.release())
                self._releases.add(task)
                task.add_done_callback(self._releases.discard)

    async def _identify(self, request: web.BaseRequest, cfg: Any) -> Facts | None:
        key = presented_key(request)
        if not key:
            return None
        key_id = identity.key_id_of(key)
        if key_id is None:
            return None
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
        model: str | None,
        product: str,
        program: str,
        started: float,
        hide_usage: bool,
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
        if request.method == "GET" and upstream_path == _MODELS_PATH:
            return await self._models(
                snap, upstream_name, url_path, out_headers, facts, product, rid, started
            )

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
        ttfb = self._ttfb.get(upstream_name)
        if ttfb is None:
            ttfb = self._ttfb[upstream_name] = metrics.UPSTREAM_TTFB.labels(upstream_name)
        ttfb.observe(result.ttfb_seconds)
        if self.meter is not None:
            # No I/O here: the write to Redis is queued; the client's bytes are already out
            # (a small body goes out when this returns, after one JSON parse).
            usage = self.meter.record(
                facts.workspace.workspace_id, program, product, model, result, cfg.pricing
            )
            if usage is not None and on_tokens is not None:
                on_tokens(usage.prompt + usage.output)
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


class _DataRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering its own errors in the OpenAI error shape.

    aiohttp refuses ambiguous framing (Content-Length with Transfer-Encoding, conflicting
    Content-Lengths) and malformed requests in its parser, before any handler runs; this keeps
    those answers to the contract: JSON error body and an ``x-request-id``.
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        if status >= 500:
            self.log_exception("error handling request", exc_info=exc)
            code = "internal_error"
        else:
            log.debug("refused a malformed request: %s", message)
            code = "request_too_large" if status == 413 else "invalid_request"
        detail = None if status >= 500 else f"Malformed HTTP request: {message or status}."
        response = deny_response(code, _request_id(), detail)
        response.force_close()
        return response


class DataServer(web.Server):
    """The low-level server for the data listener (see ``_DataRequestHandler``)."""

    def __call__(self) -> RequestHandler:
        return _DataRequestHandler(self, loop=self._loop, **self._kwargs)
