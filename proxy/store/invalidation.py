"""Cache invalidation across replicas (SPEC §5): every change publishes the cache keys it
touched; every replica subscribes and evicts them. A replica that (re)subscribes drops its whole
cache first, because messages published while it was away are lost to it."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis

from proxy.store.cache import FactCache
from proxy.store.schema import FLUSH_ALL, INVALIDATION_CHANNEL

log = logging.getLogger(__name__)


async def publish(redis: aioredis.Redis, keys: list[str]) -> None:
    """Publish the touched cache keys; a lost message is bounded by the cache TTL."""
    if keys:
        await redis.publish(INVALIDATION_CHANNEL, "\n".join(keys))


class Subscriber:
    """Keeps one subscription alive, reconnecting with backoff; evicts on every message."""

    def __init__(self, url_client: aioredis.Redis, cache: FactCache[object]) -> None:
        self.redis = url_client
        self.cache = cache
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="invalidation-subscriber")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def apply(self, message: bytes | str) -> None:
        text = message.decode() if isinstance(message, bytes) else message
        for key in text.split("\n"):
            if key == FLUSH_ALL:
                self.cache.clear()
            else:
                self.cache.invalidate(key)

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(INVALIDATION_CHANNEL)
                # Anything published while we were not subscribed is lost: start from nothing.
                self.cache.clear()
                self.connected.set()
                backoff = 0.05
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        self.apply(msg["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any Redis/socket failure: resubscribe
                if self.connected.is_set():
                    log.warning("invalidation subscription lost: %s", exc)
                self.connected.clear()
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)
