"""What a replica holds of a shared limit between Redis calls (SPEC §5, §6): a lease of requests
taken from the GCRA bucket, a pool of concurrency slots it has taken in Redis, and the token
budget as last seen (trusted only until an answer is metered here, and for ``token_flush_s``).
Pure bookkeeping on the monotonic clock; the calls are made by ``proxy.store.ratelimit``.

A lease of ``n`` requests advanced the shared TAT by ``n`` intervals when it was taken, so a
replica never holds more than ``lease_requests`` unspent requests and all replicas together admit
at most ``burst + rate × t + replicas × lease_requests`` in any ``t`` seconds. Requests left when
a lease expires, and slots idle for a lease lifetime, are given back to Redis.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from proxy.config import RateLimit


def lease_size(wanted: int, cap: int, replicas: int) -> int:
    """How many requests (or slots) to take at once: ``wanted``, but no more than this replica's
    share of ``cap`` (the burst or the concurrency cap), and at least one."""
    return max(1, min(wanted, max(1, cap) // max(1, replicas)))


@dataclass(slots=True)
class Lease:
    """One workspace and program's allowance held by this replica, for one ``limit``."""

    limit: RateLimit
    cc: str  # the concurrency key its slots are members of
    tk: str  # the token key
    interval_us: int
    units: int = 0  # requests left to admit locally
    expires: float = 0.0  # monotonic time after which ``units`` may not be used
    remaining: int = 0  # the shared bucket's remaining as last seen (after this lease)
    reset_at: float = 0.0  # monotonic time the shared bucket was full as last seen
    tokens_left: int = -1  # token budget left as last seen; -1: no token limit
    tokens_reset_at: float = 0.0
    tokens_seen: float = 0.0  # when ``tokens_left`` was seen
    tokens_used: int = 0  # metered here since ``tokens_left`` was seen
    free: list[str] = field(default_factory=list)  # slots held in Redis, not in use
    owned: set[str] = field(default_factory=set)  # every slot of the pool, in use or not
    idle_since: float = 0.0  # when the last slot in use came back
    fetching: asyncio.Future[None] | None = None
    waiting: int = 0  # requests waiting on ``fetching``

    def usable(self, now: float) -> int:
        return self.units if self.expires > now else 0

    def tokens_ok(self, now: float, fresh_s: float) -> bool:
        """Whether the token budget as seen may judge a request here: no answer was metered
        here since (its tokens must reach Redis first) and it is no older than ``fresh_s``, so
        the budget's bound across replicas is what it is with a call per request."""
        if self.tokens_left < 0:
            return True
        return not self.tokens_used and self.tokens_left > 0 and now - self.tokens_seen < fresh_s

    def shown_remaining(self, now: float) -> int:
        """The shared bucket as last seen minus what was admitted here since."""
        return max(0, self.remaining + self.usable(now))

    def shown_reset(self, now: float) -> float:
        return max(0.0, self.reset_at - now - self.usable(now) * self.interval_us / 1e6)

    def shown_tokens(self, now: float) -> tuple[int, float]:
        return max(0, self.tokens_left - self.tokens_used), max(0.0, self.tokens_reset_at - now)

    def expired_units(self, now: float) -> int:
        """Requests whose lifetime is over, taken out of the lease to be given back."""
        if self.units and self.expires <= now:
            units, self.units = self.units, 0
            return units
        return 0

    def idle_slots(self, now: float, lifetime_s: float) -> list[str]:
        """Pooled slots unused for a lifetime, taken out of the pool to be released."""
        if not self.free or now - self.idle_since < lifetime_s:
            return []
        idle, self.free = self.free, []
        self.owned.difference_update(idle)
        return idle

    def empty(self) -> bool:
        return not self.units and not self.owned and self.fetching is None


def wanted_ahead(lease: Lease, size: int, now: float) -> bool:
    """Whether to fetch the next lease in the background: half of this one is spent."""
    return lease.fetching is None and 0 < lease.usable(now) <= math.floor(size / 2)
