"""The request path's metric fronts (``metrics.tally``/``metrics.spread``): counted without a
lock, and exactly what direct updates would have given by the time anything collects them."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from proxy import metrics

_names = itertools.count()
BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name.split("_", 1)[1], tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
    }


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(
        st.one_of(
            st.sampled_from(BUCKETS),  # exactly on a bound: counted in that bucket
            st.floats(min_value=0, max_value=100, allow_nan=False),
        ),
        max_size=50,
    ),
    flush_every=st.integers(1, 60),
)
def test_a_spread_exports_what_direct_observations_would(
    values: list[float], flush_every: int
) -> None:
    n = next(_names)
    fronted, direct = CollectorRegistry(), CollectorRegistry()
    a = Histogram("h", "h", ["product"], buckets=BUCKETS, registry=fronted, namespace=f"a{n}")
    b = Histogram("h", "h", ["product"], buckets=BUCKETS, registry=direct, namespace=f"b{n}")
    front = metrics.spread(a, "api")
    b.labels("api")  # the front makes its series at once: so does the direct side
    for i, value in enumerate(values, 1):
        front.observe(value)
        b.labels("api").observe(value)
        if i % flush_every == 0:
            metrics.flush_pending()
    metrics.flush_pending()
    got, want = _samples(fronted), _samples(direct)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert abs(got[key] - value) < 1e-9, (key, got[key], value)


@settings(max_examples=50, deadline=None)
@given(amounts=st.lists(st.integers(1, 1000), max_size=30))
def test_a_tally_exports_the_sum_of_its_increments(amounts: list[int]) -> None:
    registry = CollectorRegistry()
    counter = Counter("c", "c", ["code"], registry=registry, namespace=f"t{next(_names)}")
    front = metrics.tally(counter, "ok")
    for amount in amounts:
        front.inc(amount)
    metrics.flush_pending()
    assert sum(_samples(registry).values()) == sum(amounts)


def test_a_scrape_of_the_default_registry_sees_every_pending_count() -> None:
    labels = {"product": "api", "program": "none", "code": "fronts_test"}
    before = REGISTRY.get_sample_value("access_proxy_requests_total", labels) or 0.0
    front = metrics.tally(metrics.REQUESTS, "api", "none", "fronts_test")
    for _ in range(7):
        front.inc()
    # No explicit flush: collecting the registry moves pending counts first.
    assert REGISTRY.get_sample_value("access_proxy_requests_total", labels) == before + 7
    text = metrics.exposition().decode()
    assert 'code="fronts_test",product="api",program="none"} ' in text


def test_worker_processes_write_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """With shared files the front is the metric itself: another worker's scrape sees it."""
    registry = CollectorRegistry()
    counter = Counter("w", "w", ["code"], registry=registry, namespace=f"w{next(_names)}")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/set-by-the-supervisor")
    assert metrics.tally(counter, "ok") is counter.labels("ok")
