"""Every Prometheus metric, defined once (SPEC §9). Labels are bounded: products, programs,
codes, tiers and categories come from config or fixed tables, never from clients.

``exposition()`` renders ``/metrics``: this process's registry, or with ``--workers N`` the view
merged from every worker's multiprocess files, with the same series either way: counters with
known labels from 0, ``process_*`` summed over the workers, one ``config_info`` series.

The request path counts through ``tally``/``spread``: in one process, plain numbers added up with
no lock, moved into the metrics in one step per series whenever the registry is collected (so a
scrape is exact). With worker processes every update goes to the shared files at once, as the
merged view of another worker's scrape must include it.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from prometheus_client import (
    GC_COLLECTOR,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from proxy import env

# Series that a merged view of several processes cannot show are left out of one process too:
# the *_created timestamps, and the garbage collector's per-process internals.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY.unregister(GC_COLLECTOR)


class _FlushFirst(Collector):
    """Registered before every metric, so any collection of the registry (a scrape, a test's
    ``get_sample_value``) first moves the request path's pending counts into the metrics."""

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        flush_pending()
        return []


REGISTRY.register(_FlushFirst())

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DECISION = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2, 0.1)

REQUESTS = Counter(
    "access_proxy_requests_total",
    "Requests answered, by product, program and outcome code (ok or a SPEC §3.4 code).",
    ["product", "program", "code"],
)
REQUEST_DURATION = Histogram(
    "access_proxy_request_duration_seconds",
    "Time from request start to the last byte written, by product.",
    ["product"],
    buckets=_LATENCY,
)
DECISION_DURATION = Histogram(
    "access_proxy_decision_duration_seconds",
    "Time to gather facts and decide (excluding the upstream).",
    buckets=_DECISION,
)
UPSTREAM_TTFB = Histogram(
    "access_proxy_upstream_ttfb_seconds",
    "Time from sending a request upstream to its response headers.",
    ["upstream"],
    buckets=_LATENCY,
)
INFLIGHT = Gauge(
    "access_proxy_inflight_requests",
    "Requests in flight on the data listener.",
    multiprocess_mode="livesum",
)
CACHE_LOOKUPS = Counter(
    "access_proxy_cache_lookups_total",
    "Entitlement cache lookups by result (hit, miss, stale).",
    ["result"],
)
CACHE_INVALIDATIONS = Counter(
    "access_proxy_cache_invalidations_total",
    "Cache entries evicted by invalidation messages (a full flush counts once).",
)
REDIS_ERRORS = Counter(
    "access_proxy_redis_errors_total",
    "Redis calls that failed, timed out or were refused by the open circuit, by operation.",
    ["op"],
)
FAILURE_MODE = Counter(
    "access_proxy_failure_mode_total",
    "Checks answered by their declared failure mode while a dependency was away.",
    ["check", "mode"],
)
CONFIG_RELOADS = Counter(
    "access_proxy_config_reloads_total",
    "Config reload attempts by result (ok, error).",
    ["result"],
)
# Both outcomes exist from the start, so a dashboard sees 0 errors rather than no series.
for _result in ("ok", "error"):
    CONFIG_RELOADS.labels(_result)
CONFIG_INFO = Gauge(
    "access_proxy_config_info",
    "The active config version (content hash); value 1.",
    ["version"],
    # Merged: 1 for a version some live worker runs; retired versions (0) are left out.
    multiprocess_mode="livemax",
)
MISUSE_FLAGS = Counter(
    "access_proxy_misuse_flags_total",
    "Misuse flags recorded, by category and source.",
    ["category", "source"],
)
TIER_TRANSITIONS = Counter(
    "access_proxy_tier_transitions_total",
    "Workspaces entering a misuse tier.",
    ["tier"],
)
SHADOW_DECISIONS = Counter(
    "access_proxy_shadow_decisions_total",
    "Decisions a shadow rule would have changed, by rule.",
    ["rule"],
)
TOKENS = Counter(
    "access_proxy_tokens_total",
    "Tokens metered, by program and kind (input, cached_input, cache_write, output).",
    ["program", "kind"],
)
COST = Counter(
    "access_proxy_cost_usd_total",
    "Metered cost in USD, by program and product.",
    ["program", "product"],
)
WEBSOCKET_SESSIONS = Gauge(
    "access_proxy_websocket_sessions",
    "WebSocket sessions open now, by product.",
    ["product"],
    multiprocess_mode="livesum",
)
WEBSOCKET_CLOSED = Counter(
    "access_proxy_websocket_closed_total",
    "WebSocket sessions ended, by product and reason: client, upstream, upstream_error, "
    "shutdown, or the SPEC §3.4 code that ended access.",
    ["product", "reason"],
)

# Why an answer was not metered; a fixed set.
UNMETERED_REASONS = (
    "incomplete",  # the answer did not finish: the client left or the upstream broke off
    "upstream_error",  # the upstream answered with an error status
    "encoding",  # compressed with an unknown coding, or corrupt
    "too_large",  # a body past the capture limit whose tail held no usage
    "no_usage",  # a readable answer that carries no usage
)
UNMETERED = Counter(
    "access_proxy_unmetered_answers_total",
    "Forwarded answers whose usage could not be metered, by program and reason.",
    ["program", "reason"],
)


ACCESS_LOG_DROPPED = Counter(
    "access_proxy_access_log_dropped_total",
    "Access log lines dropped because the queue was full or the sink failed.",
)


class Tally:
    """One counter series counted on the request path: a plain number, no lock per update."""

    __slots__ = ("child", "pending")

    def __init__(self, child: Counter) -> None:
        self.child = child
        self.pending = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.pending += amount

    def flush(self) -> None:
        if self.pending:
            amount, self.pending = self.pending, 0.0
            self.child.inc(amount)


class Spread:
    """One histogram series observed on the request path: bucket counts kept as plain numbers."""

    __slots__ = ("bounds", "child", "counts", "total")

    def __init__(self, child: Histogram) -> None:
        self.child = child
        self.bounds: list[float] = list(child._upper_bounds)  # ends with +Inf
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket with value <= bound
        self.total += value

    def flush(self) -> None:
        if not any(self.counts):
            return
        counts, self.counts = self.counts, [0] * len(self.bounds)
        total, self.total = self.total, 0.0
        # The histogram's own values, as its observe() updates them, n observations at a time.
        self.child._sum.inc(total)
        for bucket, n in zip(self.child._buckets, counts, strict=True):
            if n:
                bucket.inc(n)


_PENDING: dict[tuple[object, tuple[str, ...]], Tally | Spread] = {}


class Counts(Protocol):
    def inc(self, amount: float = 1.0) -> None: ...


class Observes(Protocol):
    def observe(self, amount: float) -> None: ...


def tally(counter: Counter, *labels: str) -> Counts:
    """The request path's front of ``counter.labels(*labels)``: lock-free in one process."""
    if env.multiproc_dir():
        return counter.labels(*labels) if labels else counter
    found = _PENDING.get((counter, labels))
    if found is None:
        found = _PENDING[(counter, labels)] = Tally(counter.labels(*labels) if labels else counter)
    assert isinstance(found, Tally)
    return found


def spread(histogram: Histogram, *labels: str) -> Observes:
    """The request path's front of ``histogram.labels(*labels)``: lock-free in one process."""
    if env.multiproc_dir():
        return histogram.labels(*labels) if labels else histogram
    found = _PENDING.get((histogram, labels))
    if found is None:
        child = histogram.labels(*labels) if labels else histogram
        found = _PENDING[(histogram, labels)] = Spread(child)
    assert isinstance(found, Spread)
    return found


def flush_pending() -> None:
    """Move what the request path counted into the metrics (before a scrape renders them)."""
    for front in list(_PENDING.values()):
        front.flush()


def track_inflight(read: Callable[[], float], multiprocess: bool) -> Callable[[], None] | None:
    """Make the inflight gauge read the data plane's own counter.

    In one process the gauge calls ``read`` at scrape time: no lock per request. With worker
    processes (multiprocess mode has no callback gauges) it returns a function to call
    periodically that copies the value into the shared file.
    """
    if not multiprocess:
        INFLIGHT.set_function(read)
        return None
    return lambda: INFLIGHT.set(read())


def exposition() -> bytes:
    """The text of ``/metrics`` for this process, or for all workers when they share files."""
    path = env.multiproc_dir()
    if not path:
        return generate_latest()
    registry = CollectorRegistry()
    registry.register(_Merged(path))
    registry.register(_WorkersProcess(path))
    PlatformCollector(registry=registry)
    return generate_latest(registry)


class _Merged(Collector):
    """The workers' multiprocess files, without the zeroed versions of ``config_info``."""

    def __init__(self, path: str) -> None:
        self._inner = MultiProcessCollector(None, path=path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        for metric in self._inner.collect():  # type: ignore[no-untyped-call]
            if metric.name == "access_proxy_config_info":
                metric.samples = [s for s in metric.samples if s.value]
            yield metric


_WORKER_FILE = re.compile(r"_(\d+)\.db$")
# How the workers' process series combine: the earliest start, the tightest fd limit, else sums.
_COMBINE: dict[str, Callable[[Iterable[float]], float]] = {
    "process_start_time_seconds": min,
    "process_max_fds": min,
}


class _WorkersProcess(Collector):
    """``process_*`` of the live workers (those with files in ``path``), combined."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)

    def _pids(self) -> list[int]:
        found = {
            int(m.group(1)) for f in self._path.glob("*.db") if (m := _WORKER_FILE.search(f.name))
        }
        return sorted(p for p in found if Path(f"/proc/{p}").exists())

    def collect(self) -> Iterable[Metric]:
        per_worker = [
            list(ProcessCollector(pid=lambda p=pid: p, registry=None).collect())  # type: ignore[misc]
            for pid in self._pids()
        ]
        if not per_worker:
            return
        for i, family in enumerate(per_worker[0]):
            combine = _COMBINE.get(family.name, sum)
            for j, sample in enumerate(family.samples):
                values = [w[i].samples[j].value for w in per_worker if len(w) > i]
                family.samples[j] = sample._replace(value=combine(values))
            yield family
