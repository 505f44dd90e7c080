"""Rate limits that hold across replicas (SPEC §3.4 row 12, §5, §6): requests per minute with a
burst, and a cap on concurrent requests, per workspace and program.

The rate is a GCRA bucket of ``max(1, burst)`` requests refilled at ``requests_per_minute``, so
in any interval of ``t`` seconds all replicas together admit at most ``burst + rate × t``; there
are no windows, hence no doubling at a window edge. One Lua script per request, judged against the
Redis clock, checks the bucket and takes a concurrency slot in the same round trip. A slot is a
member of a sorted set scored by its lease expiry; the background task extends the leases of
slots still held, so the slots of a replica that crashed expire on their own.

Token limits (``tokens_per_minute``, SPEC §6) live in the same script and the same call: a
request is let in while its workspace and program have at least one token of the minute's
budget left, and the tokens of its answer (input + output, from the meter) are added when it
ends. They are not sent on their own: the next ``acquire`` of this replica for the same key
carries them (so a replica never judges a request without its own earlier answers), and a
batched ``consume`` call sends whatever is still held after ``token_flush_s``. No extra round
trip on the request path; the error is bounded by the answers in flight plus those metered in
the last ``token_flush_s`` on other replicas.

With ``lease_requests`` set, a replica does not call Redis per request: it takes requests from
the bucket in small leases and concurrency slots into a pool of its own (``proxy.store.leases``),
admits from them locally, and fetches the next lease in the background when half of one is spent.
Unused requests are given back when the lease's ``lease_lifetime_s`` is over, idle slots after
a lifetime without use. Together replicas admit at most ``burst + rate × t + replicas × lease``
in any ``t`` seconds; a lease is dropped as soon as its limit changes (a tier's factor, a reload).

When Redis cannot answer, a replica limits alone with its share of the limit (the limit divided
by the replicas last seen alive), counted as ``failure_mode{check="rate_limit",mode="local"}``.
A limit marked ``shadow`` is evaluated and counted but never refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from proxy import metrics
from proxy.background import Task, every
from proxy.config import RateLimit
from proxy.store.connection import Gate, RedisUnavailable
from proxy.store.leases import Lease, lease_size, wanted_ahead
from proxy.store.resp import RespConnection, RespError
from proxy.store.schema import REPLICAS_KEY, concurrency_key, rate_key, token_key
from proxy.store.topology import RespRouter

log = logging.getLogger(__name__)

SCRIPT = resources.files("proxy.store").joinpath("ratelimit.lua").read_text(encoding="utf-8")
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode("utf-8")).hexdigest()

_US = 1_000_000
_MINUTE_US = 60 * _US
_REFRESH_BATCH = 500
# A slot refused for concurrency frees when some request ends, which no clock can tell.
_CONCURRENCY_RETRY_S = 1.0
_REASONS = {1: "rate", 2: "concurrency", 3: "tokens"}


def _seconds(value: float) -> str:
    """``1.5s`` style, at millisecond precision."""
    return f"{value:.3f}".rstrip("0").rstrip(".") + "s"


@dataclass(frozen=True, slots=True)
class Tokens:
    """The token budget of a result: per minute (this replica's share in local mode), left now,
    and seconds until it is whole again."""

    limit: int
    remaining: int
    reset_s: float


@dataclass(slots=True)  # not frozen: one is made per admitted request, and a frozen init costs
class LimitResult:
    allowed: bool  # what to enforce (always True when the limit is shadow)
    would_allow: bool  # the verdict had the limit been enforced
    limit: int  # requests per minute this replica applied (its share in local mode)
    remaining: int
    reset_s: float  # until the bucket is full again
    retry_after_s: float  # 0 when allowed
    reason: str | None  # "rate" | "concurrency" | "tokens" when the verdict is a refusal
    slot: str | None  # concurrency slot to release, None if none was taken
    mode: str  # "redis" | "local"
    tokens: Tokens | None = None  # None: no token limit

    def headers(self) -> dict[str, str]:
        out = {
            "x-ratelimit-limit-requests": str(self.limit),
            "x-ratelimit-remaining-requests": str(self.remaining),
            "x-ratelimit-reset-requests": _seconds(self.reset_s),
        }
        if self.tokens is not None:
            out["x-ratelimit-limit-tokens"] = str(self.tokens.limit)
            out["x-ratelimit-remaining-tokens"] = str(self.tokens.remaining)
            out["x-ratelimit-reset-tokens"] = _seconds(self.tokens.reset_s)
        if not self.allowed:
            out["retry-after"] = str(max(1, math.ceil(self.retry_after_s)))
        return out


class _LocalLimits:
    """The in-process fallback: GCRA on the monotonic clock and plain slot counts."""

    def __init__(self) -> None:
        self.tat: dict[str, float] = {}
        self.token_tat: dict[str, float] = {}
        self.slots: dict[str, int] = {}
        self.held: dict[str, str] = {}  # slot -> concurrency key

    def spend(self, tk: str, tpm_share: float, tokens: int) -> None:
        now = time.monotonic()
        self.token_tat[tk] = max(self.token_tat.get(tk, now), now) + tokens * 60.0 / tpm_share

    def tokens(self, tk: str, tpm_share: float) -> tuple[int, float, float]:
        """(tokens left, seconds until the budget is whole, seconds until one token is left)."""
        per = 60.0 / tpm_share
        now = time.monotonic()
        ttat = max(self.token_tat.get(tk, now), now)
        left = max(0, math.floor((now + 60.0 - ttat) / per + 1e-9))
        return left, ttat - now, ttat + per - 60.0 - now

    def acquire(
        self,
        rl: str,
        cc: str,
        limit: RateLimit,
        replicas: int,
        slot: str,
        tokens_left: bool = True,
    ) -> tuple[int, int, int, float, float]:
        """(share of rpm, reason code, remaining, reset_s, retry_after_s); reason 0 = admitted,
        3 = the token budget (``tokens_left`` False) is spent."""
        share_rpm = limit.requests_per_minute / replicas
        interval = 60.0 / share_rpm
        capacity = max(1, max(1, limit.burst) // replicas) * interval
        concurrent = max(1, limit.concurrent // replicas)
        shown = max(1, limit.requests_per_minute // replicas)
        now = time.monotonic()
        tat = max(self.tat.get(rl, now), now)
        new_tat = tat + interval
        allow_at = new_tat - capacity
        if allow_at > now:
            return shown, 1, 0, tat - now, allow_at - now
        if not tokens_left:
            remaining = math.floor((now + capacity - tat) / interval + 1e-9)
            return shown, 3, remaining, tat - now, 0.0
        if self.slots.get(cc, 0) >= concurrent:
            remaining = math.floor((now + capacity - tat) / interval + 1e-9)
            return shown, 2, remaining, tat - now, 0.0
        self.slots[cc] = self.slots.get(cc, 0) + 1
        self.held[slot] = cc
        self.tat[rl] = new_tat
        remaining = math.floor((now + capacity - new_tat) / interval + 1e-9)
        return shown, 0, remaining, new_tat - now, 0.0

    def release(self, slot: str) -> None:
        cc = self.held.pop(slot, None)
        if cc is None:
            return
        left = self.slots.get(cc, 0) - 1
        if left > 0:
            self.slots[cc] = left
        else:
            self.slots.pop(cc, None)

    def prune(self) -> None:
        """Forget full buckets: an absent bucket is a full one."""
        now = time.monotonic()
        for table in (self.tat, self.token_tat):
            for key in [k for k, tat in table.items() if tat <= now]:
                del table[key]


def _resp_for(redis: aioredis.Redis) -> RespConnection | None:
    """A pipelined connection to ``redis``'s server; None for TLS, which it does not speak."""
    pool = redis.connection_pool
    if pool.connection_class not in (aioredis.Connection, aioredis.UnixDomainSocketConnection):
        return None
    kwargs = pool.connection_kwargs
    timeout = kwargs.get("socket_connect_timeout") or 5.0
    return RespConnection.from_connection_kwargs(kwargs, connect_timeout_s=float(timeout))


class RateLimiter:
    """Rate and concurrency limits shared through Redis, with a per-replica local fallback.

    ``replica_id`` must be unique per process: it names this replica's heartbeat and prefixes its
    slot ids. ``lease_s`` is how long a slot outlives the replica that took it.

    The script calls (acquire and release on every request, heartbeat and lease refresh) go
    through ``resp``, a pipelined connection that costs far less CPU per call than redis-py; when
    ``resp`` is None one is made to the server ``redis`` talks to, and ``stop`` closes it.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        gate: Gate,
        replica_id: str,
        *,
        lease_s: float = 30.0,
        heartbeat_s: float = 5.0,
        replica_ttl_s: float | None = None,
        resp: RespRouter | None = None,
        token_flush_s: float = 0.1,
        lease_requests: int = 0,
        lease_lifetime_s: float = 0.5,
    ) -> None:
        self._redis = redis
        self._owns_resp = resp is None
        self._resp: RespRouter | None = resp if resp is not None else _resp_for(redis)
        self._gate = gate
        self.replica_id = replica_id
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s
        self.replica_ttl_s = replica_ttl_s if replica_ttl_s is not None else 3 * heartbeat_s
        self.replicas = 1  # live replicas last seen in Redis, for the local share
        self._lease_us = str(max(1, round(lease_s * _US)))
        self._seq = itertools.count(1)
        self._held: dict[str, str] = {}  # slot -> concurrency key, while leased in Redis
        self._local = _LocalLimits()
        tick = min(heartbeat_s, lease_s / 3)
        self._task = Task(
            "rate-limit-upkeep", lambda: every(tick, self._upkeep, "rate limit upkeep")
        )
        self.token_flush_s = token_flush_s
        self._spent: dict[str, tuple[int, int]] = {}  # token key -> (tokens, tokens per minute)
        self._token_flush: asyncio.TimerHandle | None = None
        self._release_batch: tuple[list[str], list[str], asyncio.Future[None]] | None = None
        self._flushing: set[asyncio.Future[Any]] = set()
        self.lease_requests = lease_requests  # 0: one Redis call per request
        self.lease_lifetime_s = lease_lifetime_s
        self._leases: dict[str, Lease] = {}  # rate key -> what this replica holds of it
        self._lent: dict[str, tuple[str, Lease, str]] = {}  # handle -> (rl, lease, slot)
        self._giveback: dict[str, int] = {}  # rate key -> microseconds to take off its TAT
        self._unpooled: list[tuple[str, str]] = []  # (concurrency key, slot) to release
        self._sweeper = Task(
            "rate-limit-leases",
            lambda: every(lease_lifetime_s / 4, self._sweep, "rate limit lease sweep"),
        )
        self._local_mode = metrics.FAILURE_MODE.labels("rate_limit", "local")
        self._shadow = metrics.SHADOW_DECISIONS.labels("rate_limit")
        self._token_shadow = metrics.SHADOW_DECISIONS.labels("token_limit")

    async def acquire(
        self, workspace_id: str, program: str | None, limit: RateLimit
    ) -> LimitResult:
        """Judge one request: from this replica's lease, else one Redis round trip, or the local
        share when Redis is away."""
        if self.lease_requests > 0:
            result = self.acquire_now(workspace_id, program, limit)
            if result is not None:
                return result
            return await self._acquire_leased(workspace_id, program, limit)
        return await self._acquire_once(workspace_id, program, limit)

    def acquire_now(
        self, workspace_id: str, program: str | None, limit: RateLimit
    ) -> LimitResult | None:
        """Judge one request from this replica's lease with no wait and no task, as ``acquire``
        would; None when that takes more (no usable lease, a fetch, a changed limit): then
        ``acquire``."""
        if self.lease_requests <= 0:
            return None
        rl = rate_key(workspace_id, program)
        lease = self._leases.get(rl)
        if lease is None or (lease.limit is not limit and lease.limit != limit):
            return None
        now = time.monotonic()
        if lease.usable(now) and lease.free and lease.tokens_ok(now, self.token_flush_s):
            return self._admit_from(rl, lease, now)
        return None

    async def _acquire_once(
        self, workspace_id: str, program: str | None, limit: RateLimit
    ) -> LimitResult:
        rl = rate_key(workspace_id, program)
        cc = concurrency_key(workspace_id, program)
        tk = token_key(workspace_id, program)
        slot = f"{self.replica_id}:{next(self._seq)}"
        tpm = limit.tokens_per_minute or 0
        # This replica's own metered tokens for the key ride along: no call of their own.
        spent = self._spent.pop(tk, (0, 0))[0] if tpm else 0
        interval_us = -(-_MINUTE_US // max(1, limit.requests_per_minute))  # ceil: never faster
        args = (
            "acquire",
            str(interval_us),
            str(max(1, limit.burst) * interval_us),
            str(max(1, limit.concurrent)),
            self._lease_us,
            slot,
            str(tpm),
            str(spent),
        )
        try:
            reply = await self._gate.call("rate_limit", lambda: self._script((rl, cc, tk), args))
        except RedisUnavailable:
            self._local_mode.inc()
            return self._acquire_locally(rl, cc, tk, limit, slot, spent)
        code, remaining, reset_us, retry_us, t_left, t_reset_us = (int(v) for v in reply[1:7])
        if code == 0:
            self._held[slot] = cc
        tokens = Tokens(tpm, t_left, max(0.0, t_reset_us / _US)) if tpm and t_left >= 0 else None
        return self._result(
            limit,
            limit.requests_per_minute,
            code,
            remaining,
            reset_us / _US,
            retry_us / _US,
            slot,
            "redis",
            tokens,
        )

    def _acquire_locally(
        self, rl: str, cc: str, tk: str, limit: RateLimit, slot: str, spent: int
    ) -> LimitResult:
        replicas = max(1, self.replicas)
        tokens: Tokens | None = None
        token_retry = 0.0
        if limit.tokens_per_minute:
            share = limit.tokens_per_minute / replicas
            if spent:
                self._local.spend(tk, share, spent)
            left, reset_s, token_retry = self._local.tokens(tk, share)
            tokens = Tokens(max(1, limit.tokens_per_minute // replicas), left, reset_s)
        shown, code, remaining, reset_s, retry_s = self._local.acquire(
            rl, cc, limit, replicas, slot, tokens is None or tokens.remaining > 0
        )
        if code == 3:
            retry_s = token_retry
        return self._result(limit, shown, code, remaining, reset_s, retry_s, slot, "local", tokens)

    async def _acquire_leased(
        self, workspace_id: str, program: str | None, limit: RateLimit
    ) -> LimitResult:
        rl = rate_key(workspace_id, program)
        lease = self._leases.get(rl)
        if lease is not None and lease.limit is not limit and lease.limit != limit:
            self._retire(rl, lease)  # a new tier factor or a reload: the old lease goes now
            lease = None
        if lease is None:
            interval_us = -(-_MINUTE_US // max(1, limit.requests_per_minute))
            lease = Lease(
                limit,
                concurrency_key(workspace_id, program),
                token_key(workspace_id, program),
                interval_us,
            )
            self._leases[rl] = lease
        for _ in range(8):  # each turn admits, waits for a fetch, or fetches
            now = time.monotonic()
            if lease.usable(now) and lease.free and lease.tokens_ok(now, self.token_flush_s):
                return self._admit_from(rl, lease, now)
            if lease.fetching is not None:
                lease.waiting += 1
                try:
                    await asyncio.shield(lease.fetching)
                finally:
                    lease.waiting -= 1
                continue
            want, slots = self._wanted(lease, now)
            refused = await self._fetch(rl, lease, want, slots)
            if refused is not None:
                return refused
        # Other requests took each lease first (or it expired unused): judge this one directly.
        return await self._acquire_once(workspace_id, program, limit)

    def _wanted(self, lease: Lease, now: float) -> tuple[int, int]:
        """Requests and slots to fetch for this request and those queued behind it: a lease's
        worth, or as many as wait (a burst of new streams), never more than this replica's share
        of the burst and of the concurrency cap, so the queue drains in a call or two."""
        limit, replicas = lease.limit, self.replicas
        demand = 1 + lease.waiting
        usable, free = lease.usable(now), len(lease.free)
        want = slots = 0
        if usable < demand:
            size = lease_size(max(self.lease_requests, demand), limit.burst, replicas)
            want = max(0, size - usable)
        if free < demand:
            pool = lease_size(max(self.lease_requests, demand), limit.concurrent, replicas)
            slots = max(0, pool - free)
        return want, slots

    def _admit_from(self, rl: str, lease: Lease, now: float) -> LimitResult:
        lease.units -= 1
        slot = lease.free.pop()
        handle = f"{slot}#{next(self._seq)}"
        self._lent[handle] = (rl, lease, slot)
        limit = lease.limit
        # A lease is never larger than lease_requests: most requests need not size it.
        if lease.fetching is None and lease.units <= self.lease_requests // 2:
            size = lease_size(self.lease_requests, limit.burst, self.replicas)
            if wanted_ahead(lease, size, now):
                ahead = self._fetch(rl, lease, size - lease.units, 0, background=True)
                task = asyncio.ensure_future(ahead)
                self._flushing.add(task)
                task.add_done_callback(self._flushing.discard)
        tokens = None
        if limit.tokens_per_minute and lease.tokens_left >= 0:
            tokens = Tokens(limit.tokens_per_minute, *lease.shown_tokens(now))
        remaining, reset_s = lease.shown_remaining(now), lease.shown_reset(now)
        rpm = limit.requests_per_minute
        return LimitResult(True, True, rpm, remaining, reset_s, 0.0, None, handle, "redis", tokens)

    async def _fetch(
        self, rl: str, lease: Lease, want: int, slots: int, *, background: bool = False
    ) -> LimitResult | None:
        """Take ``want`` requests and ``slots`` slots into ``lease`` in one call (and refresh
        the token budget seen). A refusal is returned (None in the ``background``, which judges
        no request); None when the lease was filled."""
        limit = lease.limit
        tpm = limit.tokens_per_minute or 0
        spent = self._spent.pop(lease.tk, (0, 0))[0] if tpm else 0
        ids = [f"{self.replica_id}:{next(self._seq)}" for _ in range(slots)]
        args = (
            "lease",
            str(lease.interval_us),
            str(max(1, limit.burst) * lease.interval_us),
            str(max(1, limit.concurrent)),
            self._lease_us,
            str(tpm),
            str(spent),
            str(want),
            *ids,
        )
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lease.fetching = done
        try:
            keys = (rl, lease.cc, lease.tk)
            reply = await self._gate.call("rate_limit", lambda: self._script(keys, args))
        except RedisUnavailable:
            if background:
                return None
            self._local_mode.inc()
            slot = f"{self.replica_id}:{next(self._seq)}"
            return self._acquire_locally(rl, lease.cc, lease.tk, limit, slot, spent)
        finally:
            lease.fetching = None
            done.set_result(None)
        code, remaining, reset_us, retry_us, t_left, t_reset_us, granted, got = (
            int(v) for v in reply[1:9]
        )
        now = time.monotonic()
        if tpm and t_left >= 0:
            lease.tokens_left, lease.tokens_used = t_left, 0
            lease.tokens_reset_at = now + t_reset_us / _US
            lease.tokens_seen = now
        lease.remaining, lease.reset_at = remaining, now + reset_us / _US
        if code != 0 and background:
            return None
        if code != 0:
            tokens = Tokens(tpm, t_left, max(0.0, t_reset_us / _US)) if tpm else None
            rpm = limit.requests_per_minute
            reset_s, retry_s = reset_us / _US, retry_us / _US
            return self._result(limit, rpm, code, remaining, reset_s, retry_s, "", "redis", tokens)
        if granted:
            self._give_back(rl, lease, lease.expired_units(now))
            lease.units += granted
            lease.expires = now + self.lease_lifetime_s
        for slot in ids[:got]:
            lease.free.append(slot)
            lease.owned.add(slot)
            self._held[slot] = lease.cc
        lease.idle_since = now
        return None

    def _give_back(self, rl: str, lease: Lease, units: int) -> None:
        if units:
            self._giveback[rl] = self._giveback.get(rl, 0) + units * lease.interval_us

    def _retire(self, rl: str, lease: Lease) -> None:
        """Drop a lease: its requests are given back and its idle slots released at the next
        sweep; slots still in use are released in Redis when their requests end."""
        del self._leases[rl]
        self._give_back(rl, lease, lease.units)
        lease.units = 0
        self._unpool(lease, lease.free)
        lease.free = []

    def _unpool(self, lease: Lease, slots: list[str]) -> None:
        for slot in slots:
            lease.owned.discard(slot)
            if self._held.pop(slot, None) is not None:
                self._unpooled.append((lease.cc, slot))

    async def _sweep(self) -> None:
        """Give back the requests of expired leases and release slots idle for a lifetime."""
        now = time.monotonic()
        for rl, lease in list(self._leases.items()):
            self._give_back(rl, lease, lease.expired_units(now))
            self._unpool(lease, lease.idle_slots(now, self.lease_lifetime_s))
            if lease.empty():
                del self._leases[rl]
        await self._send_returns()

    async def _send_returns(self) -> None:
        giveback, self._giveback = self._giveback, {}
        unpooled, self._unpooled = self._unpooled, []
        if giveback:
            keys = list(giveback)
            for group_keys, values in self._by_group(keys, [str(giveback[k]) for k in keys]):
                # Lost if Redis cannot answer: the requests were only ever leased, never used.
                with contextlib.suppress(RedisUnavailable):
                    await self._gate.call(
                        "rate_limit_release",
                        partial(self._script, group_keys, ["giveback", *values]),
                    )
        if unpooled:
            keys, slots = [cc for cc, _ in unpooled], [slot for _, slot in unpooled]
            for group_keys, group_slots in self._by_group(keys, slots):
                # On failure the slots are no longer refreshed; their leases run out.
                with contextlib.suppress(RedisUnavailable):
                    await self._gate.call(
                        "rate_limit_release",
                        partial(self._script, group_keys, ["release", *group_slots]),
                    )

    def consume(
        self, workspace_id: str, program: str | None, tokens: int, tokens_per_minute: int
    ) -> None:
        """Add the metered tokens of an answer to its token budget. No I/O here: they go with
        this replica's next ``acquire`` for the key, or in a batch after ``token_flush_s``."""
        if tokens <= 0 or tokens_per_minute <= 0:
            return
        tk = token_key(workspace_id, program)
        lease = self._leases.get(rate_key(workspace_id, program))
        if lease is not None:
            lease.tokens_used += tokens
        held = self._spent.get(tk, (0, 0))[0]
        self._spent[tk] = (held + tokens, tokens_per_minute)
        if self._token_flush is None:
            loop = asyncio.get_running_loop()
            self._token_flush = loop.call_later(self.token_flush_s, self._start_token_flush)

    def _start_token_flush(self) -> None:
        self._token_flush = None
        task = asyncio.ensure_future(self._flush_tokens())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _flush_tokens(self) -> None:
        batch, self._spent = self._spent, {}
        by_group: dict[int, list[tuple[str, tuple[int, int]]]] = {}
        for item in batch.items():
            # One script call touches one Cluster slot.
            group = self._resp.group(item[0]) if self._resp is not None else 0
            by_group.setdefault(group, []).append(item)
        parts = [
            items[start : start + _REFRESH_BATCH]
            for items in by_group.values()
            for start in range(0, len(items), _REFRESH_BATCH)
        ]
        for part in parts:
            args = ["consume"]
            for _, (tokens, tpm) in part:
                args += [str(tpm), str(tokens)]
            try:
                await self._gate.call(
                    "rate_limit_tokens", partial(self._script, [tk for tk, _ in part], args)
                )
            except RedisUnavailable:
                # Counted where this replica judges alone until Redis answers again.
                replicas = max(1, self.replicas)
                for tk, (tokens, tpm) in part:
                    self._local.spend(tk, tpm / replicas, tokens)

    def _result(
        self,
        limit: RateLimit,
        shown: int,
        code: int,
        remaining: int,
        reset_s: float,
        retry_s: float,
        slot: str,
        mode: str,
        tokens: Tokens | None = None,
    ) -> LimitResult:
        would_allow = code == 0
        if not would_allow and limit.shadow:
            (self._token_shadow if code == 3 else self._shadow).inc()
        allowed = would_allow or limit.shadow
        if allowed:
            retry_s = 0.0
        elif code == 2:
            retry_s = _CONCURRENCY_RETRY_S
        return LimitResult(
            allowed=allowed,
            would_allow=would_allow,
            limit=shown,
            remaining=max(0, remaining),
            reset_s=max(0.0, reset_s),
            retry_after_s=retry_s,
            reason=_REASONS.get(code),
            slot=slot if would_allow else None,
            mode=mode,
            tokens=tokens,
        )

    async def release(self, result: LimitResult) -> None:
        """Free the result's concurrency slot where it was taken (``free``), and wait for the
        Redis call when one is needed. Safe to call twice."""
        pending = self.free(result)
        if pending is not None:
            await pending

    def free(self, result: LimitResult) -> Awaitable[None] | None:
        """Free the result's concurrency slot where it was taken. Safe to call twice.

        A slot that goes back to this replica's pool, or to its local count, is free when this
        returns (None: nothing to wait for). A slot held in Redis is queued for one call shared
        by the releases of this loop turn, and what is returned completes when that call is
        done. If Redis cannot answer, the slot is no longer refreshed and its lease runs out.
        """
        slot = result.slot
        if slot is None:
            return None
        if result.mode == "local":
            self._local.release(slot)
            return None
        lent = self._lent.pop(slot, None)
        if lent is not None:
            rl, lease, member = lent
            if self._leases.get(rl) is lease and member in lease.owned:
                lease.free.append(member)  # back to the pool: no call
                lease.idle_since = time.monotonic()
                return None
            slot = member  # its lease was dropped: free the slot in Redis
        cc = self._held.pop(slot, None)
        if cc is None:
            return None
        if self._release_batch is None:
            # Releases that end in the same loop turn share one Redis call.
            self._release_batch = ([], [], asyncio.get_running_loop().create_future())
            self._flushing.add(asyncio.ensure_future(self._flush_releases()))
        keys, slots, done = self._release_batch
        keys.append(cc)
        slots.append(slot)
        return asyncio.shield(done)

    async def _flush_releases(self) -> None:
        batch, self._release_batch = self._release_batch, None
        assert batch is not None
        keys, slots, done = batch
        try:
            for group_keys, group_slots in self._by_group(keys, slots):
                # On failure the slots are no longer refreshed; their leases run out.
                with contextlib.suppress(RedisUnavailable):
                    await self._gate.call(
                        "rate_limit_release",
                        partial(self._script, group_keys, ["release", *group_slots]),
                    )
        finally:
            done.set_result(None)
            self._flushing.discard(asyncio.current_task())

    def _by_group(self, keys: list[str], values: list[str]) -> list[tuple[list[str], list[str]]]:
        """Split (key, value) pairs so each script call touches one Cluster slot."""
        if self._resp is None:
            return [(keys, values)]
        groups: dict[int, tuple[list[str], list[str]]] = {}
        for key, value in zip(keys, values, strict=True):
            group = groups.setdefault(self._resp.group(key), ([], []))
            group[0].append(key)
            group[1].append(value)
        return list(groups.values())

    async def start(self) -> None:
        """Announce this replica and start the background heartbeat and lease refresh."""
        await self._heartbeat()
        self._task.start()
        if self.lease_requests > 0:
            self._sweeper.start()

    async def stop(self) -> None:
        if self._token_flush is not None:
            self._token_flush.cancel()
            self._token_flush = None
        if self._spent:
            await self._flush_tokens()
        await self._task.stop()
        await self._sweeper.stop()
        for rl, lease in list(self._leases.items()):
            self._retire(rl, lease)
        await self._send_returns()
        with contextlib.suppress(RedisUnavailable):
            await self._gate.call(
                "rate_limit_heartbeat", lambda: self._redis.zrem(REPLICAS_KEY, self.replica_id)
            )
        if self._owns_resp and self._resp is not None:
            await self._resp.close()

    async def _upkeep(self) -> None:
        await self._heartbeat()
        await self._refresh()
        self._local.prune()

    async def _heartbeat(self) -> None:
        ttl_us = str(max(1, round(self.replica_ttl_s * _US)))
        args = ("heartbeat", ttl_us, self.replica_id)
        try:
            live = await self._gate.call(
                "rate_limit_heartbeat", lambda: self._script((REPLICAS_KEY,), args)
            )
        except RedisUnavailable:
            return
        self.replicas = max(1, int(live))

    async def _refresh(self) -> None:
        """Extend the leases of the slots held now; a released one is simply not extended."""
        held = list(self._held.items())
        for start in range(0, len(held), _REFRESH_BATCH):
            batch = held[start : start + _REFRESH_BATCH]
            by_group = self._by_group([cc for _, cc in batch], [slot for slot, _ in batch])
            for keys, slots in by_group:
                args = ["refresh", self._lease_us, *slots]
                try:
                    await self._gate.call("rate_limit_refresh", partial(self._script, keys, args))
                except RedisUnavailable:
                    return

    async def _script(self, keys: Sequence[str], args: Sequence[str]) -> Any:
        resp = self._resp
        if resp is None:
            try:
                return await self._redis.evalsha(SCRIPT_SHA, len(keys), *keys, *args)
            except NoScriptError:
                # EVAL also caches the script, so the next EVALSHA finds it.
                return await self._redis.eval(SCRIPT, len(keys), *keys, *args)
        try:
            return await resp.call_for(keys[0], "EVALSHA", SCRIPT_SHA, len(keys), *keys, *args)
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            return await resp.call_for(keys[0], "EVAL", SCRIPT, len(keys), *keys, *args)
