"""Smoke test of the benchmark suite: ``benchmarks/run.py`` runs end to end in a tiny mode and
reports every case, the decision cost and the revocation delay. No performance number is
asserted; only that each measurement happened and every request was answered as allowed."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"

WRK_OUTPUT = """Running 1s test @ http://127.0.0.1:8080/v1/chat/completions
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     9.13ms    2.01ms  40.12ms   90.00%
    Req/Sec     3.50k   120.00     3.70k    80.00%
  Latency Distribution
     50%  812.00us
     75%    9.90ms
     90%   11.00ms
     99%    1.02s
  3500 requests in 1.00s, 2.10MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 4
Requests/sec:   3497.51
Transfer/sec:      2.10MB
"""


def load_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def run_bench(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", "--json", *args],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def check_complete(result: dict[str, Any]) -> None:
    cases = [c["name"] for c in result["cases"]]
    assert {"upstream", "baseline", "access-proxy"} <= set(cases)
    rows = {(r["case"], r["concurrency"]): r for r in result["throughput"]}
    assert set(rows) == {(c, n) for c in cases for n in result["settings"]["concurrencies"]}
    for (case, _), row in rows.items():
        assert row["requests"] > 0, row
        assert row["errors"] == 0, row
        assert row["p50_ms"] is not None and row["p99_ms"] >= row["p50_ms"], row
        if case.startswith("access-proxy") or case == "baseline-pool":
            assert row["ratio_to_baseline"] is not None and row["ratio_to_baseline"] > 0
        else:
            assert row["ratio_to_baseline"] is None
    decision = result["decision"]
    for field in ("decide_us", "cache_hit_path_us", "cache_hit_path_with_key_check_us"):
        assert decision[field] > 0, decision
    access_log = result["access_log"]
    for field in ("request_path_off_us", "request_path_all_us", "writer_per_line_us"):
        assert access_log[field] > 0, access_log
    for row in result["throughput"]:
        if row["kind"] != "upstream":  # the servers' own CPU time per request was read
            assert row["cpu_us_per_request"] > 0, row
    revocation = result["revocation"]
    assert revocation["refused"] == revocation["trials"] > 0, revocation
    assert revocation["timeouts"] == 0
    assert revocation["p99_ms"] >= revocation["p50_ms"] > 0


def test_parse_wrk_reads_rate_percentiles_and_failures() -> None:
    loadgen = load_module("loadgen")
    result = loadgen.parse_wrk(WRK_OUTPUT)
    assert result.requests == 3500
    assert result.rps == pytest.approx(3497.51)
    assert result.p50_ms == pytest.approx(0.812)
    assert result.p99_ms == pytest.approx(1020.0)
    assert result.errors == 7


def test_percentile_interpolates() -> None:
    loadgen = load_module("loadgen")
    assert loadgen.percentile([4.0, 1.0, 3.0, 2.0], 0.5) == pytest.approx(2.5)
    assert loadgen.percentile([1.0, 2.0], 0.99) == pytest.approx(1.99)
    assert loadgen.percentile([7.0], 0.99) == 7.0


def test_fallbacks_python_load_and_mock_upstream() -> None:
    result = run_bench(
        "--load",
        "python",
        "--upstream",
        "mock",
        "--duration",
        "0.5",
        "--revocation-trials",
        "3",
        "--decide-iterations",
        "2000",
    )
    check_complete(result)
    assert result["load_generator"].startswith("python")
    assert result["upstream"].startswith("mock")
    assert any("Python load generator" in note for note in result["notes"])
    assert any("mock upstream" in note for note in result["notes"])


@pytest.mark.skipif(
    shutil.which("wrk") is None or shutil.which("nginx") is None, reason="needs wrk and nginx"
)
def test_wrk_against_nginx() -> None:
    result = run_bench(
        "--concurrency", "4", "--revocation-trials", "2", "--decide-iterations", "2000"
    )
    check_complete(result)
    assert result["load_generator"].startswith("wrk")
    assert result["upstream"].startswith("nginx")
    assert result["notes"] == []


def test_streams_benchmark_relays_every_chunk_in_order() -> None:
    """``benchmarks/streams.py`` in a tiny mode: both targets relay every stream whole and in
    order (its exit code says so), and each figure is measured."""
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "streams.py"),
            "--streams",
            "20",
            "--chunks",
            "5",
            "--chunk-delay-ms",
            "5",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert [r["target"] for r in result["results"]] == ["baseline", "access-proxy"]
    for r in result["results"]:
        assert (r["ok"], r["broken"]) == (20, 0), r
        assert r["ttfb_p50_ms"] > 0 and r["cpu_us_per_chunk"] >= 0, r
