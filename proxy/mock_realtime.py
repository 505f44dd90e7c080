"""The mock upstream's Realtime API: a WebSocket at ``/v1/realtime?model=...`` (mounted by
``proxy.mock_upstream``) for the demo and the tests.

It answers like a realtime model server, as simply as can be: ``session.created`` on connect,
``session.updated`` for ``session.update``, ``response.created`` / ``response.text.delta`` /
``response.done`` (with usage) for ``response.create``, an ``error`` event for a text frame that
is not JSON, binary frames echoed back, and any other event echoed as ``mock.echo``. Two events
steer it: ``{"type": "mock.close", "code": 4001, "reason": "..."}`` closes with that code and
``{"type": "mock.ping", "payload": "..."}`` sends a ping; the request header
``x-mock-first-byte-delay-ms`` holds the handshake's answer back. It pongs every ping itself and
records the pongs it receives.

Every session is recorded (``GET /_mock/realtime``): its request id, query, headers, chosen
subprotocol, the events and pongs received, how it closed, and ``models_read``: every model name
the session could have been asked to run, read as leniently as any server might (a query key
``model`` in any case or spacing, pairs split on ``&`` and ``;``, every ``model`` of a
``session`` or ``response`` object even under duplicate keys). The tests assert on that list.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections import deque
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import WSMsgType, web

PROTOCOLS = ("realtime",)
_SPLIT = re.compile("[&;]")


def query_models(raw_query: str) -> list[str]:
    """Every value a lenient server could read as the query's model, as written."""
    found: list[str] = []
    for parts in (raw_query.split("&"), _SPLIT.split(raw_query)):
        for part in parts:
            key, _, value = part.partition("=")
            if unquote_plus(key).strip().lower() == "model":
                found.append(unquote_plus(value))
    return found


def _all_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        out.setdefault(key, []).append(value)
    return out


def event_models(text: str | bytes) -> list[str]:
    """Every ``model`` under a ``session`` or ``response`` object, duplicates included."""
    try:
        doc = json.loads(text, object_pairs_hook=_all_pairs)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return []
    found: list[str] = []
    for part in ("session", "response"):
        for holder in doc.get(part, []) if isinstance(doc, dict) else []:
            if isinstance(holder, dict):
                found += [m for m in holder.get("model", []) if isinstance(m, str)]
    return found


class Realtime:
    """The WebSocket handler and its record of sessions."""

    def __init__(self, max_recorded: int = 1000) -> None:
        self.sessions: deque[dict[str, Any]] = deque(maxlen=max(max_recorded, 1))
        self._ids = itertools.count(1)

    def install(self, app: web.Application) -> None:
        app.router.add_get("/v1/realtime", self.handle)
        app.router.add_get("/_mock/realtime", self._list)
        app.router.add_delete("/_mock/realtime", self._clear)

    async def _list(self, request: web.Request) -> web.Response:
        wanted = request.query.get("request_id")
        found = [s for s in self.sessions if wanted is None or s["request_id"] == wanted]
        return web.json_response({"sessions": found})

    async def _clear(self, request: web.Request) -> web.Response:
        self.sessions.clear()
        return web.json_response({"cleared": True})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        query = request.rel_url.raw_query_string
        record: dict[str, Any] = {
            "id": f"sess_mock_{next(self._ids)}",
            "request_id": request.headers.get("x-request-id"),
            "query": query,
            "headers": [[k, v] for k, v in request.headers.items()],
            "models_read": query_models(query),
            "protocol": None,
            "events": [],
            "pongs": [],
            "close_code": None,
            "closed_at": None,
        }
        self.sessions.append(record)
        delay_ms = request.headers.get("x-mock-first-byte-delay-ms")
        if delay_ms:  # the handshake answer is held back, as a slow upstream would
            await asyncio.sleep(float(delay_ms) / 1000)
        ws = web.WebSocketResponse(protocols=PROTOCOLS, autoping=False)
        await ws.prepare(request)
        record["protocol"] = ws.ws_protocol
        models = record["models_read"]
        model = models[-1] if models else None
        session = {"id": record["id"], "object": "realtime.session", "model": model}
        await ws.send_json({"type": "session.created", "event_id": "evt_0", "session": session})
        try:
            await self._serve(ws, record, session)
        finally:
            record["close_code"] = ws.close_code
            record["closed_at"] = time.time()
        return ws

    async def _serve(self, ws: web.WebSocketResponse, record: dict[str, Any], session: Any) -> None:
        async for msg in ws:
            if msg.type is WSMsgType.PING:
                await ws.pong(msg.data)
            elif msg.type is WSMsgType.PONG:
                record["pongs"].append(msg.data.decode("utf-8", "replace"))
            elif msg.type is WSMsgType.BINARY:
                record["models_read"] += event_models(msg.data)
                record["events"].append({"binary": len(msg.data)})
                await ws.send_bytes(msg.data)
            elif msg.type is WSMsgType.TEXT:
                record["models_read"] += event_models(msg.data)
                if not await self._event(ws, record, session, msg.data):
                    return

    async def _event(
        self, ws: web.WebSocketResponse, record: dict[str, Any], session: Any, text: str
    ) -> bool:
        """Answer one client event; False once the mock closed the session."""
        try:
            event = json.loads(text)
            kind = event["type"]
        except (ValueError, KeyError, TypeError):
            error = {"type": "invalid_request_error", "code": "invalid_event", "message": "bad"}
            await ws.send_json({"type": "error", "error": error})
            return True
        record["events"].append(event)
        if kind == "session.update" and isinstance(event.get("session"), dict):
            session.update(event["session"])
            await ws.send_json({"type": "session.updated", "session": session})
        elif kind == "response.create":
            await self._respond(ws)
        elif kind == "mock.close":
            code = int(event.get("code", 1000))
            await ws.close(code=code, message=str(event.get("reason", "")).encode())
            return False
        elif kind == "mock.ping":
            await ws.ping(str(event.get("payload", "")).encode())
        else:
            await ws.send_json({"type": "mock.echo", "event": event})
        return True

    @staticmethod
    async def _respond(ws: web.WebSocketResponse) -> None:
        response = {"id": "resp_mock", "object": "realtime.response", "status": "in_progress"}
        await ws.send_json({"type": "response.created", "response": response})
        for word in ("This ", "is ", "a ", "mock ", "reply."):
            await ws.send_json({"type": "response.text.delta", "delta": word})
        usage = {"total_tokens": 15, "input_tokens": 10, "output_tokens": 5}
        done = dict(response, status="completed", usage=usage)
        await ws.send_json({"type": "response.done", "response": done})
