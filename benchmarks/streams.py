"""Streams at scale: N concurrent SSE chat streams (default 1,000 of 50 chunks, 20 ms apart)
through the bare pass-through baseline and through one access-proxy worker with full enforcement,
one after the other on the same mock upstream.

Reported per target: time to first byte p50/p99 (and, for access-proxy, what it adds to the
baseline's), the whole stream's duration p50/p99, the target's CPU time per relayed chunk, its
resident memory per open stream (peak minus idle, over the streams open at once), and every
stream checked for lost or reordered chunks (the mock's reply numbers its chunks).

Run: ``make bench-streams`` or ``.venv/bin/python benchmarks/streams.py [--streams N]
[--chunks N] [--chunk-delay-ms MS] [--json]``. It starts its own Redis, mock upstream, baseline
and proxy on free loopback ports, like ``run.py``, and stops them at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from run import (
    HERE,
    MODEL,
    PATH,
    PEPPER,
    Bench,
    Processes,
    Settings,
    base_config,
    free_port,
    machine,
    seed,
    start_proxy,
)

from proxy import identity
from proxy.redis_server import RedisServer
from proxy.store.connection import make_client
from proxy.store.writes import Writes

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class StreamResult:
    ttfb_s: float
    duration_s: float
    status: int
    intact: bool  # every chunk arrived, once, in order
    why: str = ""  # for a broken stream: the status and error code, or "chunks"


@dataclass
class TargetResult:
    target: str
    streams: int
    ok: int
    broken: int  # lost, duplicated or reordered chunks, or a non-200 answer
    broken_by: dict[str, int]  # why, for each broken stream
    ttfb_p50_ms: float
    ttfb_p99_ms: float
    duration_p50_s: float
    duration_p99_s: float
    cpu_us_per_chunk: float
    rss_kib_per_stream: float


def reply_text(chunks: int) -> str:
    """A reply the mock cuts into ``chunks`` pieces, each naming its own index."""
    return " ".join(f"{i:05d}" for i in range(chunks))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _proc_rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


async def one_stream(
    session: aiohttp.ClientSession, url: str, key: str, chunks: int, delay_ms: float
) -> StreamResult:
    expected = reply_text(chunks)
    body = {
        "model": MODEL,
        "stream": True,
        "messages": [{"role": "user", "content": "count"}],
    }
    headers = {
        "authorization": f"Bearer {key}",
        "x-mock-chunks": str(chunks),
        "x-mock-chunk-delay-ms": str(delay_ms),
        "x-mock-reply": expected,
    }
    started = time.perf_counter()
    ttfb = float("nan")
    text: list[str] = []
    async with session.post(url + PATH, json=body, headers=headers) as resp:
        if resp.status != 200:
            raw = await resp.read()
            try:
                code = json.loads(raw)["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = raw[:40].decode(errors="replace")
            elapsed = time.perf_counter() - started
            return StreamResult(elapsed, elapsed, resp.status, False, f"{resp.status} {code}")
        buffer = b""
        async for data in resp.content.iter_any():
            if ttfb != ttfb:  # first bytes of the body
                ttfb = time.perf_counter() - started
            buffer += data
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                for line in event.split(b"\n"):
                    if line.startswith(b"data: ") and line != b"data: [DONE]":
                        doc = json.loads(line[6:])
                        for choice in doc.get("choices") or ():
                            text.append(choice.get("delta", {}).get("content") or "")
        status = resp.status
    intact = "".join(text) == expected
    return StreamResult(
        ttfb, time.perf_counter() - started, status, intact, "" if intact else "chunks"
    )


async def measure(
    name: str, url: str, pid: int, key: str, streams: int, chunks: int, delay_ms: float
) -> TargetResult:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await one_stream(session, url, key, 2, 0)  # warm the path (and the proxy's cache)
        idle_rss, cpu_before = _proc_rss_bytes(pid), _proc_cpu_s(pid)
        peak = idle_rss
        tasks = [
            asyncio.create_task(one_stream(session, url, key, chunks, delay_ms))
            for _ in range(streams)
        ]
        while not all(t.done() for t in tasks):
            peak = max(peak, _proc_rss_bytes(pid))
            await asyncio.wait(tasks, timeout=0.05)
        cpu = _proc_cpu_s(pid) - cpu_before
    results = [t.result() for t in tasks]
    good = [r for r in results if r.status == 200 and r.intact]
    return TargetResult(
        target=name,
        streams=streams,
        ok=len(good),
        broken=streams - len(good),
        broken_by=dict(Counter(r.why for r in results if r.why)),
        ttfb_p50_ms=_percentile([r.ttfb_s for r in good], 0.5) * 1000,
        ttfb_p99_ms=_percentile([r.ttfb_s for r in good], 0.99) * 1000,
        duration_p50_s=_percentile([r.duration_s for r in good], 0.5),
        duration_p99_s=_percentile([r.duration_s for r in good], 0.99),
        cpu_us_per_chunk=cpu / max(1, len(good) * chunks) * 1e6,
        rss_kib_per_stream=(peak - idle_rss) / 1024 / streams,
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="access-proxy-streams-"))
    procs = Processes(workdir)
    redis = RedisServer(workdir / "redis", persistent=False)
    await redis.start()
    admin = make_client(redis.url, timeout_s=5.0)
    try:
        upstream_port, baseline_port = free_port(), free_port()
        procs.spawn(
            "mock-upstream",
            [sys.executable, "-m", "proxy.mock_upstream", "--port", str(upstream_port)],
        )
        await procs.wait_listening("mock-upstream", upstream_port)
        upstream = f"http://127.0.0.1:{upstream_port}"
        procs.spawn(
            "baseline",
            [
                sys.executable,
                str(HERE / "baseline_proxy.py"),
                "--port",
                str(baseline_port),
                "--upstream",
                upstream,
            ],
        )
        await procs.wait_listening("baseline", baseline_port)
        peppers = identity.parse_peppers(PEPPER)
        writes = Writes(admin)
        settings = Settings()
        bench = Bench(settings, workdir, procs, redis, writes, peppers, "mock", "python", [])
        bench.proxy_config = base_config(upstream, redis.url, workdir / "state")
        seeded = await seed(writes, peppers)
        # Full enforcement, rate limits on but out of reach: every stream holds a slot.
        limits = {"requests_per_minute": 10**7, "burst": 10**6, "concurrent": 10**6}
        url = await start_proxy(
            bench, "access-proxy", {"rate_limits": {"enabled": True, "default": limits}}
        )
        targets = {
            "baseline": (f"http://127.0.0.1:{baseline_port}", procs.running["baseline"].pid),
            "access-proxy": (url, procs.running["access-proxy"].pid),
        }
        results = []
        for name, (target_url, pid) in targets.items():
            print(f"{name}: {args.streams} streams ...", file=sys.stderr, flush=True)
            results.append(
                await measure(
                    name,
                    target_url,
                    pid,
                    seeded.key,
                    args.streams,
                    args.chunks,
                    args.chunk_delay_ms,
                )
            )
        base, proxy = results
        return {
            "machine": machine(),
            "streams": args.streams,
            "chunks": args.chunks,
            "chunk_delay_ms": args.chunk_delay_ms,
            "results": [asdict(r) for r in results],
            "added_ttfb_p50_ms": proxy.ttfb_p50_ms - base.ttfb_p50_ms,
            "added_ttfb_p99_ms": proxy.ttfb_p99_ms - base.ttfb_p99_ms,
        }
    finally:
        procs.stop_all()
        with contextlib.suppress(Exception):
            await admin.aclose()
        await redis.stop()


def render(out: dict[str, Any]) -> str:
    lines = [
        f"{out['streams']} concurrent SSE streams, {out['chunks']} chunks each, "
        f"{out['chunk_delay_ms']} ms apart",
        "",
        "| target | ok | broken | TTFB p50 | TTFB p99 | stream p50 | stream p99 "
        "| CPU / chunk | RSS / stream |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in out["results"]:
        lines.append(
            f"| {r['target']} | {r['ok']} | {r['broken']} | {r['ttfb_p50_ms']:.1f} ms "
            f"| {r['ttfb_p99_ms']:.1f} ms | {r['duration_p50_s']:.2f} s "
            f"| {r['duration_p99_s']:.2f} s | {r['cpu_us_per_chunk']:.0f} µs "
            f"| {r['rss_kib_per_stream']:.1f} KiB |"
        )
    for r in out["results"]:
        if r["broken"]:
            lines.append(f"{r['target']}: broken streams by cause: {r['broken_by']}")
    lines += [
        "",
        f"access-proxy adds {out['added_ttfb_p50_ms']:.1f} ms (p50) and "
        f"{out['added_ttfb_p99_ms']:.1f} ms (p99) to the time to first byte.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--chunk-delay-ms", type=float, default=20.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    out = asyncio.run(run(args))
    print(json.dumps(out, indent=2) if args.json else render(out))
    broken = sum(r["broken"] for r in out["results"])
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
