"""Usage and cost metering (SPEC §10): read ``usage`` from upstream answers, price it from config,
count it in metrics at once and add it up per workspace in Redis off the request path.

Token kinds are disjoint: ``input`` is the *uncached* input, so the four kinds add up to the
answer's total. OpenAI-shaped usage (``prompt_tokens`` / ``input_tokens``) counts cached and
cache-write tokens inside the prompt; uncached input is the prompt minus both, never negative.
Anthropic-shaped usage (``cache_read_input_tokens``, ``cache_creation_input_tokens``) counts them
beside ``input_tokens``, and is read that way.

Prices are USD per 1M tokens from ``pricing.models``. A cache read costs ``cached_input`` when the
model sets it, else the input rate less ``cached_input_discount`` (90% off by default); a cache
write costs ``cache_write`` when set, else the input rate × ``cache_write_multiplier`` (1.25). A
model without a price has its tokens counted at cost 0.

:class:`Meter` does no Redis I/O on the request path: ``record`` counts the metrics and adds the
usage to pending increments coalesced per workspace, model and UTC day; one background task writes
them in batches. While Redis is away the increments stay pending (memory bounded by workspaces ×
models × days the outage spans) and are retried with backoff until they land. Delivery is at least
once: a batch whose EXEC succeeded but whose reply was lost is written again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import RedisError, ResponseError

from proxy import fastjson, metrics
from proxy.background import Backoff, Task
from proxy.config import Pricing
from proxy.store.usage import UsageDelta, UsageStore, day_of

log = logging.getLogger(__name__)

# A JSON body up to this size is parsed whole; a bigger one is searched for its "usage" object.
WHOLE_PARSE_BYTES = 64 * 1024
_USAGE_KEY = b'"usage"'
_MAX_USAGE_PROBES = 16
_PER_MILLION = 1_000_000


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one answer by kind; ``input`` is uncached input."""

    input: int
    cached_input: int
    cache_write: int
    output: int

    @property
    def prompt(self) -> int:
        """Every input token: uncached, cache reads and cache writes."""
        return self.input + self.cached_input + self.cache_write

    def kinds(self) -> tuple[tuple[str, int], ...]:
        return (
            ("input", self.input),
            ("cached_input", self.cached_input),
            ("cache_write", self.cache_write),
            ("output", self.output),
        )


class Answer(Protocol):
    """What the meter needs of a forwarded answer (``proxy.dataplane.forward.ForwardResult``)."""

    @property
    def status(self) -> int: ...

    @property
    def completed(self) -> bool: ...

    @property
    def captured(self) -> bytes: ...

    @property
    def is_stream(self) -> bool: ...

    @property
    def capture_whole(self) -> bool: ...

    @property
    def capture_problem(self) -> str | None: ...


# --------------------------------------------------------------------------- extraction


def _count(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return 0


def usage_from_object(u: Any) -> Usage | None:
    """A ``usage`` object (chat, responses or Anthropic names) as :class:`Usage`."""
    if not isinstance(u, dict):
        return None
    if "prompt_tokens" in u or "completion_tokens" in u:
        prompt, output = u.get("prompt_tokens"), u.get("completion_tokens")
        details = u.get("prompt_tokens_details")
    elif "input_tokens" in u or "output_tokens" in u:
        prompt, output = u.get("input_tokens"), u.get("output_tokens")
        details = u.get("input_tokens_details")
    else:
        return None
    prompt_n, output_n = _count(prompt), _count(output)
    if "cache_read_input_tokens" in u or "cache_creation_input_tokens" in u:
        return Usage(
            input=prompt_n,
            cached_input=_count(u.get("cache_read_input_tokens")),
            cache_write=_count(u.get("cache_creation_input_tokens")),
            output=output_n,
        )
    if not isinstance(details, dict):
        details = {}
    cached = min(_count(details.get("cached_tokens")), prompt_n)
    write = min(_count(details.get("cache_write_tokens")), prompt_n - cached)
    return Usage(prompt_n - cached - write, cached, write, output_n)


def _from_answer(obj: Any) -> Usage | None:
    """The usage of an answer object or event: its ``usage``, or its ``response.usage``."""
    if not isinstance(obj, dict):
        return None
    found = usage_from_object(obj.get("usage"))
    if found is None:
        response = obj.get("response")
        if isinstance(response, dict):
            found = usage_from_object(response.get("usage"))
    return found


def _probe_large_json(body: bytes) -> Usage | None:
    """Find the ``"usage": {...}`` object near the end of a large body without parsing it all."""
    decoder = json.JSONDecoder()
    end = len(body)
    for _ in range(_MAX_USAGE_PROBES):
        at = body.rfind(_USAGE_KEY, 0, end)
        if at < 0:
            return None
        end = at
        if at > 0 and body[at - 1 : at] == b"\\":
            continue  # inside a string
        text = body[at + len(_USAGE_KEY) :].decode("utf-8", errors="replace")
        colon = len(text) - len(text.lstrip())
        if text[colon : colon + 1] != ":":
            continue
        start = colon + 1
        start += len(text[start:]) - len(text[start:].lstrip())
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        found = usage_from_object(value)
        if found is not None:
            return found
    return None


def _from_sse(data: bytes) -> Usage | None:
    """The usage of the last event that carries one."""
    events = data.replace(b"\r\n", b"\n").split(b"\n\n")
    for event in reversed(events):
        if _USAGE_KEY not in event:
            continue
        lines = [
            line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
        ]
        payload = b"\n".join(lines)
        try:
            obj = fastjson.loads(payload)
        except ValueError:
            continue
        found = _from_answer(obj)
        if found is not None:
            return found
    return None


def extract_usage(captured: bytes, is_stream: bool, whole: bool = True) -> Usage | None:
    """The usage of an answer: a JSON body (``whole`` False: the tail of one), or the tail of an
    SSE stream. None when absent or unreadable."""
    if _USAGE_KEY not in captured:
        return None
    if is_stream:
        return _from_sse(captured)
    if not whole or len(captured) > WHOLE_PARSE_BYTES:
        return _probe_large_json(captured)
    try:
        obj = fastjson.loads(captured)
    except ValueError:
        return None
    return _from_answer(obj)


# --------------------------------------------------------------------------- pricing


def price(usage: Usage, model: str | None, pricing: Pricing) -> float:
    """The cost of ``usage`` on ``model`` in USD; 0 for a model without a price."""
    p = pricing.models.get(model) if model is not None else None
    if p is None:
        return 0.0
    cached_rate = (
        p.cached_input
        if p.cached_input is not None
        else p.input * (1.0 - pricing.cached_input_discount)
    )
    write_rate = (
        p.cache_write if p.cache_write is not None else p.input * pricing.cache_write_multiplier
    )
    per_million = (
        usage.input * p.input
        + usage.cached_input * cached_rate
        + usage.cache_write * write_rate
        + usage.output * p.output
    )
    return per_million / _PER_MILLION


# --------------------------------------------------------------------------- the meter


class Meter:
    """Counts usage in metrics at once and writes it to Redis in the background, retrying while
    Redis is away."""

    def __init__(
        self,
        store: UsageStore,
        *,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 2.0,
        flush_interval_s: float = 0.1,
        retention_days: Callable[[], int] = lambda: 400,
    ) -> None:
        self.store = store
        self.retention_days = retention_days
        self.flush_interval_s = flush_interval_s
        self._stopped = asyncio.Event()
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self._pending: dict[tuple[str, str | None, str], UsageDelta] = {}
        self._writing: dict[tuple[str, str | None, str], UsageDelta] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._task = Task("usage-meter", self._run)
        self._tokens: dict[tuple[str, str], metrics.Counts] = {}
        self._cost: dict[tuple[str, str], metrics.Counts] = {}
        self._unmetered: dict[tuple[str, str], Any] = {}

    @property
    def pending(self) -> int:
        """Workspace, model and day entries with increments not yet written (or being
        written)."""
        if not self._writing:
            return len(self._pending)
        return len(self._pending.keys() | self._writing.keys())

    def record(
        self,
        workspace_id: str,
        program: str | None,
        product: str,
        model: str | None,
        result: Answer,
        pricing: Pricing,
    ) -> Usage | None:
        """Meter one forwarded answer, or count it unmetered with its reason. Synchronous and
        free of I/O."""
        label = program or "none"
        usage: Usage | None = None
        if not result.completed:
            reason = "incomplete"
        elif result.status >= 400:
            reason = "upstream_error"
        elif result.capture_problem is not None:
            reason = result.capture_problem
        else:
            usage = extract_usage(result.captured, result.is_stream, result.capture_whole)
            reason = "no_usage" if result.capture_whole else "too_large"
        if usage is None:
            self.unmetered(label, reason)
            return None
        cost = price(usage, model, pricing)
        for kind, n in usage.kinds():
            if n:
                child = self._tokens.get((label, kind))
                if child is None:
                    child = self._tokens[(label, kind)] = metrics.tally(metrics.TOKENS, label, kind)
                child.inc(n)
        if cost > 0:
            child = self._cost.get((label, product))
            if child is None:
                child = self._cost[(label, product)] = metrics.tally(metrics.COST, label, product)
            child.inc(cost)
        delta = UsageDelta(
            1, usage.input, usage.cached_input, usage.cache_write, usage.output, cost
        )
        self._add_pending((workspace_id, model, day_of(time.time())), delta)
        self._wake.set()
        return usage

    def unmetered(self, program: str, reason: str) -> None:
        """Count an answer whose usage could not be read (``reason`` from
        ``metrics.UNMETERED_REASONS``)."""
        child = self._unmetered.get((program, reason))
        if child is None:
            child = self._unmetered[(program, reason)] = metrics.UNMETERED.labels(program, reason)
        child.inc()

    def _add_pending(self, key: tuple[str, str | None, str], delta: UsageDelta) -> None:
        held = self._pending.get(key)
        if held is None:
            self._pending[key] = delta
        else:
            held.merge(delta)

    def _restore(self, batch: dict[tuple[str, str | None, str], UsageDelta]) -> None:
        for key, delta in batch.items():
            self._add_pending(key, delta)

    def start(self) -> None:
        if not self._task.running:
            self._stopping = False
            self._task.start()

    async def stop(self, timeout: float = 5.0) -> None:
        """Write what is pending, for up to ``timeout`` seconds, then stop the writer."""
        if not self._task.running:
            return
        self._stopping = True
        self._stopped.set()
        self._wake.set()
        await self._task.wait(timeout)
        await self._task.stop()
        if self._pending:
            log.warning(
                "usage of %d workspace/model pairs not written: Redis unavailable at shutdown",
                len(self._pending),
            )

    async def _run(self) -> None:
        backoff = Backoff(self.retry_initial_s, self.retry_max_s)
        failing = False
        while True:
            if not self._pending:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self._pending = self._pending, {}
            self._writing = batch
            try:
                await self.store.add(batch, self.retention_days())
            except asyncio.CancelledError:
                self._restore(batch)
                raise
            except ResponseError as exc:
                if "WRONGTYPE" in str(exc):
                    # The rest of the transaction was applied; writing it again would count twice.
                    log.error("usage batch partly refused by Redis, not retried: %s", exc)
                    self._restore(batch)  # what is left: the other workspaces' shares
                    continue
                failing = self._failed(batch, exc, failing)
            except (RedisError, OSError) as exc:
                failing = self._failed(batch, exc, failing)
            else:
                if failing:
                    log.info("usage writes to Redis resumed")
                failing = False
                backoff.reset()
                self._writing = {}
                if not self._stopping:
                    # Let answers gather: one write per interval, whatever the request rate.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopped.wait(), self.flush_interval_s)
                continue
            finally:
                self._writing = {}
            await backoff.wait()

    def _failed(
        self, batch: dict[tuple[str, str | None, str], UsageDelta], exc: Exception, failing: bool
    ) -> bool:
        self._restore(batch)
        metrics.REDIS_ERRORS.labels("usage").inc()
        if not failing:
            log.warning("usage write failed, kept for retry: %s", type(exc).__name__)
        return True
