"""The in-process entitlement cache (SPEC §5).

Entries carry the time they were read. A fresh entry (younger than ``ttl``) answers with no Redis
round trip. An older one is re-read; if Redis cannot answer, an entry younger than
``stale_if_error`` still answers (counted as ``stale``), anything else fails closed with
``EntitlementUnavailable``. Concurrent misses for one key share one load (single flight).

Invalidation evicts an entry and bumps a generation counter; a load that started before an
invalidation may answer its own waiters but is not stored, so a revoked key cannot be re-cached
from a read that raced the revocation.

``revalidate_all`` (run when the invalidation subscription comes back, since publications made
while it was away are lost) makes every held entry stale at once instead of dropping it: the next
lookup of each re-reads Redis, and while Redis cannot answer yet (a circuit breaker still open
after an outage) the entry keeps answering within the stale window. Recovery so refuses nothing
that the outage served, and a change made while cut off is read on the first lookup after.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from cachetools import LRUCache

from proxy import metrics
from proxy.store.connection import RedisUnavailable

V = TypeVar("V")
_MISSING: Any = object()


class EntitlementUnavailable(Exception):
    """No usable facts: Redis is away and nothing young enough is cached."""


class FactCache(Generic[V]):
    def __init__(self, max_entries: int) -> None:
        self._entries: LRUCache[str, tuple[Any, float]] = LRUCache(maxsize=max_entries)
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self.generation = 0
        self._valid_from = float("-inf")  # entries read before this are stale, whatever their age
        self._hit = metrics.CACHE_LOOKUPS.labels("hit")
        self._miss = metrics.CACHE_LOOKUPS.labels("miss")
        self._stale = metrics.CACHE_LOOKUPS.labels("stale")

    def __len__(self) -> int:
        return len(self._entries)

    def fresh(self, key: str, ttl: float) -> Any:
        """The cached value if younger than ``ttl``, else the ``MISSING`` sentinel. No await."""
        entry = self._entries.get(key)
        if entry is not None and time.monotonic() - entry[1] < ttl and entry[1] >= self._valid_from:
            self._hit.inc()
            return entry[0]
        return _MISSING

    async def load(
        self, key: str, loader: Callable[[], Awaitable[Any]], stale_if_error: float
    ) -> Any:
        """Read through to Redis, sharing the read with concurrent callers for the same key.

        The read runs in its own task, so a caller that goes away (client disconnect) does not
        cancel it for the others.
        """
        task = self._inflight.get(key)
        if task is None:
            self._miss.inc()
            task = asyncio.ensure_future(self._read(key, loader, stale_if_error))
            self._inflight[key] = task
        return await asyncio.shield(task)

    async def _read(
        self, key: str, loader: Callable[[], Awaitable[Any]], stale_if_error: float
    ) -> Any:
        gen = self.generation
        try:
            value = await loader()
        except RedisUnavailable as exc:
            entry = self._entries.get(key)
            if entry is not None and time.monotonic() - entry[1] < stale_if_error:
                self._stale.inc()
                metrics.FAILURE_MODE.labels("entitlement", "stale").inc()
                return entry[0]
            metrics.FAILURE_MODE.labels("entitlement", "closed").inc()
            raise EntitlementUnavailable(str(exc)) from exc
        finally:
            if self._inflight.get(key) is asyncio.current_task():
                del self._inflight[key]
        if gen == self.generation:
            self._entries[key] = (value, time.monotonic())
        return value

    async def get(
        self, key: str, loader: Callable[[], Awaitable[Any]], ttl: float, stale_if_error: float
    ) -> Any:
        value = self.fresh(key, ttl)
        if value is _MISSING:
            value = await self.load(key, loader, stale_if_error)
        return value

    def invalidate(self, key: str) -> None:
        self.generation += 1
        self._inflight.pop(key, None)
        if self._entries.pop(key, None) is not None:
            metrics.CACHE_INVALIDATIONS.inc()

    def revalidate_all(self) -> None:
        """Make every entry stale: re-read on its next lookup, still a fallback if Redis fails."""
        self.generation += 1
        self._inflight.clear()
        self._valid_from = time.monotonic()
        metrics.CACHE_INVALIDATIONS.inc()

    def clear(self) -> None:
        self.generation += 1
        self._inflight.clear()
        self._entries.clear()
        metrics.CACHE_INVALIDATIONS.inc()


MISSING = _MISSING
