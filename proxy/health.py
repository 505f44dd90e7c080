"""The admin listener's own routes beside the admin API, unguarded by admin tokens: ``/healthz``
(the process is alive), ``/readyz`` (config loaded, Redis reachable, not draining: SPEC §2) and
``/metrics`` (Prometheus, merged across workers)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy import eventloop, metrics
from proxy.snapshot import Holder


class Health:
    """Answers the health, readiness and metrics routes of one serving process."""

    def __init__(
        self,
        holder: Holder,
        redis: aioredis.Redis,
        subscribed: asyncio.Event,
        draining: Callable[[], bool],
    ) -> None:
        self.holder = holder
        self.redis = redis
        self.subscribed = subscribed  # the invalidation subscription is up
        self.draining = draining

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def redis_ok(self) -> bool:
        try:
            async with asyncio.timeout(0.5):
                return bool(await self.redis.ping())
        except Exception:
            return False

    async def readyz(self, request: web.Request) -> web.Response:
        redis_ok = await self.redis_ok()
        draining = self.draining()
        ready = redis_ok and not draining
        body = {
            "status": "ready" if ready else "not_ready",
            "config_version": self.holder.current.config.version,
            "redis": "ok" if redis_ok else "unreachable",
            "invalidation": "subscribed" if self.subscribed.is_set() else "down",
            "draining": draining,
            "event_loop": eventloop.running(),
        }
        return web.json_response(body, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=metrics.exposition(), headers={"content-type": CONTENT_TYPE_LATEST}
        )
