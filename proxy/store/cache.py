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
import enum
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Generic, Literal, TypeVar

from cachetools import LRUCache

from proxy import metrics
from proxy.store.connection import RedisUnavailable

V = TypeVar("V")
W = TypeVar("W")


class _Missing(enum.Enum):
    MISSING = "missing"


MISSING: Final = _Missing.MISSING  # what ``fresh`` answers when it has nothing young enough
Missing = Literal[_Missing.MISSING]


class EntitlementUnavailable(Exception):
    """No usable facts: Redis is away and nothing young enough is cached."""


class _Shared:
    """What every typed view of one cache shares: the entries, the loads in flight, and the
    generation that an invalidation bumps."""

    def __init__(self, max_entries: int) -> None:
        self.entries: LRUCache[str, tuple[Any, float]] = LRUCache(maxsize=max_entries)
        self.inflight: dict[str, asyncio.Future[Any]] = {}
        self.generation = 0
        self.valid_from = float("-inf")  # entries read before this are stale, whatever their age


class FactCache(Generic[V]):
    """Values of type ``V`` by key. ``typed()`` gives a view for another value type over the same
    entries, so keys, workspaces and grants share one size bound, one invalidation and one
    flush, and each reader gets back the type it stored."""

    def __init__(self, max_entries: int, *, _shared: _Shared | None = None) -> None:
        self._shared = _shared if _shared is not None else _Shared(max_entries)
        self._entries = self._shared.entries
        self._inflight = self._shared.inflight
        self._hit = metrics.tally(metrics.CACHE_LOOKUPS, "hit")
        self._miss = metrics.tally(metrics.CACHE_LOOKUPS, "miss")
        self._stale = metrics.tally(metrics.CACHE_LOOKUPS, "stale")

    def typed(self) -> FactCache[Any]:
        """A view over the same entries, to be annotated with its value type."""
        return FactCache(0, _shared=self._shared)

    @property
    def generation(self) -> int:
        return self._shared.generation

    def __len__(self) -> int:
        return len(self._entries)

    def fresh(self, key: str, ttl: float) -> V | Missing:
        """The cached value if younger than ``ttl``, else ``MISSING``. No await."""
        entry = self._entries.get(key)
        if (
            entry is not None
            and time.monotonic() - entry[1] < ttl
            and entry[1] >= self._shared.valid_from
        ):
            self._hit.inc()
            value: V = entry[0]
            return value
        return MISSING

    async def load(self, key: str, loader: Callable[[], Awaitable[V]], stale_if_error: float) -> V:
        """Read through to Redis, sharing the read with concurrent callers for the same key.

        The read runs in its own task, so a caller that goes away (client disconnect) does not
        cancel it for the others.
        """
        task = self._inflight.get(key)
        if task is None:
            self._miss.inc()
            task = asyncio.ensure_future(self._read(key, loader, stale_if_error))
            self._inflight[key] = task
        value: V = await asyncio.shield(task)
        return value

    async def _read(self, key: str, loader: Callable[[], Awaitable[V]], stale_if_error: float) -> V:
        gen = self._shared.generation
        try:
            value = await loader()
        except RedisUnavailable as exc:
            entry = self._entries.get(key)
            if entry is not None and time.monotonic() - entry[1] < stale_if_error:
                self._stale.inc()
                metrics.FAILURE_MODE.labels("entitlement", "stale").inc()
                stale: V = entry[0]
                return stale
            metrics.FAILURE_MODE.labels("entitlement", "closed").inc()
            raise EntitlementUnavailable(str(exc)) from exc
        finally:
            if self._inflight.get(key) is asyncio.current_task():
                del self._inflight[key]
        if gen == self._shared.generation:
            self._entries[key] = (value, time.monotonic())
        return value

    def invalidate(self, key: str) -> None:
        self._shared.generation += 1
        self._inflight.pop(key, None)
        if self._entries.pop(key, None) is not None:
            metrics.CACHE_INVALIDATIONS.inc()

    def revalidate_all(self) -> None:
        """Make every entry stale: re-read on its next lookup, still a fallback if Redis fails."""
        self._shared.generation += 1
        self._inflight.clear()
        self._shared.valid_from = time.monotonic()
        metrics.CACHE_INVALIDATIONS.inc()

    def clear(self) -> None:
        self._shared.generation += 1
        self._inflight.clear()
        self._entries.clear()
        metrics.CACHE_INVALIDATIONS.inc()
