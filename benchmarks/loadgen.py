"""Load generators for the benchmark: ``wrk`` when it is on PATH, a Python one otherwise.

Both send the same request (a JSON chat completion ``POST`` with an ``Authorization`` header) for
a fixed duration over a fixed number of keep-alive connections and report requests per second,
the latency median and 99th percentile, and how many answers were not 200.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests: int
    errors: int  # answers other than 200, and transport failures
    rps: float
    p50_ms: float
    p99_ms: float


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``samples`` by linear interpolation; NaN when empty."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def wrk_path() -> str | None:
    return shutil.which("wrk")


_LUA = """wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
{headers}
"""


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_wrk_script(path: Path, body: bytes, headers: Mapping[str, str]) -> Path:
    """A wrk Lua script that POSTs ``body`` with ``headers``."""
    lines = "\n".join(
        f"wrk.headers[{_lua_string(name)}] = {_lua_string(value)}"
        for name, value in headers.items()
    )
    path.write_text(_LUA.format(body=_lua_string(body.decode()), headers=lines))
    return path


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _to_ms(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text.strip())
    if match is None:
        raise ValueError(f"unreadable wrk latency {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> LoadResult:
    """Requests, req/s, p50, p99 and failures from ``wrk --latency`` output."""
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    if rps is None or total is None or p50 is None or p99 is None:
        raise ValueError(f"unreadable wrk output:\n{output}")
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_2xx is not None:
        errors += int(non_2xx.group(1))
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if sock is not None:
        errors += sum(int(g) for g in sock.groups())
    return LoadResult(
        requests=int(total.group(1)),
        errors=errors,
        rps=float(rps.group(1)),
        p50_ms=_to_ms(p50.group(1)),
        p99_ms=_to_ms(p99.group(1)),
    )


def run_wrk(
    url: str, script: Path, concurrency: int, duration_s: float, wrk: str = "wrk"
) -> LoadResult:
    """One wrk run on one thread (the machine is small: leave the cores to the servers)."""
    seconds = max(1, round(duration_s))
    cmd = [
        wrk,
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


async def run_python(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    concurrency: int,
    duration_s: float,
) -> LoadResult:
    """``concurrency`` workers, each on its own keep-alive connection, for ``duration_s``."""
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    all_headers = {"content-type": "application/json", **headers}
    latencies: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=10)
    ) as session:

        async def worker(deadline: float) -> None:
            nonlocal errors
            while True:
                start = time.perf_counter()
                if start >= deadline:
                    return
                try:
                    async with session.post(url, data=body, headers=all_headers) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                latencies.append(time.perf_counter() - start)
                if not ok:
                    errors += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker(began + duration_s) for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return LoadResult(
        requests=len(latencies),
        errors=errors,
        rps=len(latencies) / elapsed if elapsed > 0 else 0.0,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
    )
