"""Cache invalidation across replicas (SPEC §5): every change publishes the cache keys it
touched; every replica subscribes and evicts them. A replica that (re)subscribes makes its whole
cache stale first, because messages published while it was away are lost to it: every entry is
re-read on its next lookup, and still answers (within the stale window) while Redis cannot.

Listeners (open WebSocket sessions) hear every eviction after it happened: the keys evicted, or
``None`` when the whole cache was dropped or made stale."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

import redis.asyncio as aioredis

from proxy.background import Task
from proxy.store.cache import FactCache
from proxy.store.pubsub import subscribe_forever
from proxy.store.schema import FLUSH_ALL, INVALIDATION_CHANNEL

log = logging.getLogger(__name__)


async def publish(redis: aioredis.Redis, keys: list[str]) -> None:
    """Publish the touched cache keys; a lost message is bounded by the cache TTL."""
    if keys:
        await redis.publish(INVALIDATION_CHANNEL, "\n".join(keys))


class Subscriber:
    """Keeps one subscription alive, reconnecting with backoff; evicts on every message."""

    def __init__(
        self,
        url_client: aioredis.Redis,
        cache: FactCache[object],
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        self.redis = url_client
        self.cache = cache
        # Told when a subscription is made: Redis answers again (the hot path's breaker may try).
        self.on_reconnect = on_reconnect
        self.connected = asyncio.Event()
        self._task = Task("invalidation-subscriber", self._run)
        self.listeners: list[Callable[[Iterable[str] | None], None]] = []

    def start(self) -> None:
        self._task.start()

    async def stop(self) -> None:
        await self._task.stop()

    def apply(self, message: bytes | str) -> None:
        text = message.decode() if isinstance(message, bytes) else message
        keys = text.split("\n")
        for key in keys:
            if key == FLUSH_ALL:
                self.cache.clear()
            else:
                self.cache.invalidate(key)
        self._tell(None if FLUSH_ALL in keys else keys)

    def _revalidate(self) -> None:
        self.cache.revalidate_all()
        if self.on_reconnect is not None:
            self.on_reconnect()
        self._tell(None)

    def _tell(self, keys: Iterable[str] | None) -> None:
        for listener in self.listeners:
            try:
                listener(keys)
            except Exception:
                log.exception("invalidation listener failed")

    async def _run(self) -> None:
        # Anything published while not subscribed is lost: revalidate everything on each
        # subscribe, without dropping what can still answer if Redis is not back for reads yet.
        await subscribe_forever(
            self.redis,
            INVALIDATION_CHANNEL,
            on_subscribed=self._revalidate,
            on_message=self.apply,
            connected=self.connected,
            what="invalidation",
        )
