"""``--workers N`` shows the same series as one process (SPEC §2, §9): the same metric names and,
for series whose labels are known before any traffic, the same label sets; counters start at 0;
``process_*`` is there (summed over the workers); ``config_info`` is one series, with no ``pid``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.conftest import Stack, metric_samples, request
from tests.e2e.test_reload_e2e import MODEL, ReloadableProxy, launch

Samples = list[tuple[str, dict[str, str], float]]


@pytest.fixture
def one(stack: Stack, tmp_path: Path) -> Iterator[ReloadableProxy]:
    started = launch(stack, tmp_path / "one", workers=1)
    try:
        yield started
    finally:
        assert started.serve.stop() == 0, started.serve.log()


@pytest.fixture
def two(stack: Stack, tmp_path: Path) -> Iterator[ReloadableProxy]:
    started = launch(stack, tmp_path / "two", workers=2)
    try:
        yield started
    finally:
        assert started.serve.stop() == 0, started.serve.log()


def series(samples: Samples) -> set[tuple[str, frozenset[tuple[str, str]]]]:
    """Names and label sets; the config version differs (the two configs name other ports)."""
    return {
        (name, frozenset((k, "*" if k == "version" else v) for k, v in labels.items()))
        for name, labels, _ in samples
    }


async def test_two_workers_show_the_series_of_one_process(
    one: ReloadableProxy, two: ReloadableProxy, http: aiohttp.ClientSession
) -> None:
    single = await metric_samples(http, one.serve.admin_url)
    multi = await metric_samples(http, two.serve.admin_url)
    names_single = {name for name, _, _ in single}
    names_multi = {name for name, _, _ in multi}
    assert names_single == names_multi, (
        f"only with one process: {sorted(names_single - names_multi)}; "
        f"only with workers: {sorted(names_multi - names_single)}"
    )
    # Before any traffic both show the same series (labels included), apart from values.
    assert series(single) == series(multi), (
        sorted(series(single) - series(multi)),
        sorted(series(multi) - series(single)),
    )
    for samples in (single, multi):
        info = [labels for name, labels, _ in samples if name == "access_proxy_config_info"]
        assert len(info) == 1 and set(info[0]) == {"version"}, info
        assert any(name.startswith("process_") for name, _, _ in samples)
    # Counters with known labels start at 0 in both.
    for samples in (single, multi):
        reloads = {
            labels["result"]: value
            for name, labels, value in samples
            if name == "access_proxy_config_reloads_total"
        }
        assert reloads == {"ok": 0.0, "error": 0.0}, reloads
    # The workers' process series add up: more memory than one of them alone would use.
    rss = {
        which: next(v for n, _, v in samples if n == "process_resident_memory_bytes")
        for which, samples in (("one", single), ("two", multi))
    }
    assert rss["two"] > rss["one"] * 1.5, rss


async def test_workers_count_what_they_serve_from_zero(
    two: ReloadableProxy, http: aiohttp.ClientSession
) -> None:
    # An unknown key: refused at row 2 on whichever worker; the merged counter shows it once.
    answer = await request(http, two.serve.data_url, key="sk-ap-nope", model=MODEL)
    assert answer.status == 401
    samples = await metric_samples(http, two.serve.admin_url)
    refused = [
        value
        for name, labels, value in samples
        if name == "access_proxy_requests_total" and labels.get("code") == "invalid_api_key"
    ]
    assert refused == [1.0], refused
