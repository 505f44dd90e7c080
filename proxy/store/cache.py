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

A ``Memo`` holds a value derived from several entries (a workspace's ``Facts``) so that a warm
lookup checks one record instead of each entry. It answers exactly when every one of its
entries would: each is still the one stored (an entry that is invalidated, replaced, evicted or
cleared is marked dead), none is older than the ``ttl`` asked for, and none was read before the
last ``revalidate_all``.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Generic, Literal, TypeVar

from cachetools import Cache, LRUCache

from proxy import metrics
from proxy.store.connection import RedisUnavailable

V = TypeVar("V")
W = TypeVar("W")

# How often a memo that keeps answering refreshes its entries' place in the LRU order.
_TOUCH_S = 1.0


class _Missing(enum.Enum):
    MISSING = "missing"


MISSING: Final = _Missing.MISSING  # what ``fresh`` answers when it has nothing young enough
Missing = Literal[_Missing.MISSING]


class EntitlementUnavailable(Exception):
    """No usable facts: Redis is away and nothing young enough is cached."""


class Entry:
    """One cached value and when it was read; ``live`` until it leaves the cache."""

    __slots__ = ("key", "live", "read_at", "value")

    def __init__(self, key: str, value: Any, read_at: float) -> None:
        self.key = key
        self.value = value
        self.read_at = read_at
        self.live = True


class _Entries(LRUCache[str, Entry]):
    """The LRU bound of the entries; whatever takes an entry out (invalidation, replacement,
    eviction, clear) marks it dead, so no memo built on it answers again."""

    def __setitem__(self, key: str, value: Entry) -> None:
        old = self.peek(key)
        if old is not None:
            old.live = False
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        old = self.peek(key)
        if old is not None:
            old.live = False
        super().__delitem__(key)

    def clear(self) -> None:
        for key in list(self.keys()):
            entry = self.peek(key)
            if entry is not None:
                entry.live = False
        super().clear()

    def peek(self, key: str) -> Entry | None:
        """The entry for ``key`` without moving it in the LRU order."""
        try:
            entry: Entry = Cache.__getitem__(self, key)
        except KeyError:
            return None
        return entry


class Memo(Generic[W]):
    """A value derived from some entries, answered while all of them would be (see the top)."""

    __slots__ = ("entries", "oldest", "touched", "value")

    def __init__(self, value: W, entries: tuple[Entry, ...], now: float) -> None:
        self.value = value
        self.entries = entries
        self.oldest = min(e.read_at for e in entries)
        self.touched = now


class _Shared:
    """What every typed view of one cache shares: the entries, the loads in flight, and the
    generation that an invalidation bumps."""

    def __init__(self, max_entries: int) -> None:
        self.entries = _Entries(maxsize=max_entries)
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

    @property
    def max_entries(self) -> int:
        return int(self._entries.maxsize)

    def __len__(self) -> int:
        return len(self._entries)

    def fresh(self, key: str, ttl: float) -> V | Missing:
        """The cached value if younger than ``ttl``, else ``MISSING``. No await."""
        entry = self._entries.get(key)
        if (
            entry is not None
            and time.monotonic() - entry.read_at < ttl
            and entry.read_at >= self._shared.valid_from
        ):
            self._hit.inc()
            value: V = entry.value
            return value
        return MISSING

    def memo(self, value: W, parts: Sequence[tuple[str, object]]) -> Memo[W] | None:
        """A memo of ``value``, derived from the values of ``parts`` (key, value as looked up),
        or None unless each of those values is the one the cache holds now: a value answered by
        a read that raced an invalidation is not memoised (one served stale may be, but its
        entry is past the ttl, so that memo never answers)."""
        entries = []
        for key, seen in parts:
            entry = self._entries.peek(key)
            if entry is None or entry.value is not seen:
                return None
            entries.append(entry)
        return Memo(value, tuple(entries), time.monotonic()) if entries else None

    def recall(self, memo: Memo[W] | None, ttl: float) -> W | Missing:
        """The memo's value if every entry it stands on is cached, younger than ``ttl`` and
        read since the last ``revalidate_all``; else ``MISSING``. Counted as a hit per entry,
        as the lookups it replaces. No await."""
        if memo is None:
            return MISSING
        now = time.monotonic()
        if now - memo.oldest >= ttl or memo.oldest < self._shared.valid_from:
            return MISSING
        entries = memo.entries
        for entry in entries:
            if not entry.live:
                return MISSING
        self._hit.inc(len(entries))
        if now - memo.touched >= _TOUCH_S:
            memo.touched = now
            for entry in entries:
                self._entries.get(entry.key)  # still recently used, for the LRU bound
        return memo.value

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
            if entry is not None and time.monotonic() - entry.read_at < stale_if_error:
                self._stale.inc()
                metrics.FAILURE_MODE.labels("entitlement", "stale").inc()
                stale: V = entry.value
                return stale
            metrics.FAILURE_MODE.labels("entitlement", "closed").inc()
            raise EntitlementUnavailable(str(exc)) from exc
        finally:
            if self._inflight.get(key) is asyncio.current_task():
                del self._inflight[key]
        if gen == self._shared.generation:
            self._entries[key] = Entry(key, value, time.monotonic())
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
