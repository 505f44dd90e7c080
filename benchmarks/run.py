"""The access-proxy benchmark: throughput and latency against a bare proxy, decision cost, and
revocation delay, in one run.

Throughput cases (``CASES``) are measured in alternation, round after round, at each concurrency,
and their medians reported: the upstream direct, the bare pass-through ``baseline_proxy.py``, and
access-proxy with full enforcement on a warm cache. The load comes from ``wrk`` when it is on PATH,
else from a Python load generator; the upstream is nginx answering a canned completion when it is
installed, else the mock upstream. Then, in process, the cost of one ``decide()`` call and of the
whole cache-hit path; then, over two access-proxy processes sharing Redis, how long after a
revocation returns the second process refuses the key.

Run: ``python benchmarks/run.py`` (``make bench``); ``--quick`` for a short smoke run, ``--json``
for machine-readable results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import getpass
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import loadgen
import yaml

from proxy import accesslog, identity
from proxy import config as config_mod
from proxy.policy import RequestInfo, decide
from proxy.redis_server import RedisServer
from proxy.store.cache import FactCache
from proxy.store.connection import Breaker, Gate, make_client
from proxy.store.entitlements import Entitlements
from proxy.store.writes import Actor, Writes
from proxy.surfaces import named_models

HERE = Path(__file__).resolve().parent

PROGRAM = "gpt-5.6-preview"
MODEL = "gpt-5.6-sol"
PRODUCT = "api"
PATH = "/v1/chat/completions"
PEPPER = "v1:" + "bench-pepper-" + "0123456789abcdefghijklmno"
UPSTREAM_API_KEY = "sk-upstream-bench"
ACTOR = Actor("benchmark", "benchmark")
ORG_ID = "org_bench"
WS_ID = "ws_bench"
WARM_DEADLINE_S = 20.0

CHAT_BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "Say hello in one word."}]},
    separators=(",", ":"),
).encode()

# What nginx answers: the mock upstream's chat completion, byte for byte in shape.
CANNED_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "This is a mock reply from the upstream model.",
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 9,
            "total_tokens": 14,
            "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        },
    },
    separators=(",", ":"),
)

UNLIMITED = {"requests_per_minute": 1_000_000_000, "burst": 1_000_000_000, "concurrent": 1_000_000}
TARGETS = {"throughput_ratio_min": 0.9, "decide_us_max": 20.0, "revocation_p99_ms_max": 100.0}


@dataclass(frozen=True, slots=True)
class Case:
    """One throughput case. ``kind`` is ``upstream``, ``baseline`` or ``proxy``; a proxy case
    runs its own access-proxy process with ``config`` merged over the benchmark's config, a
    baseline case ``baseline_proxy.py`` with ``args``."""

    name: str
    kind: str
    config: Mapping[str, Any] = field(default_factory=dict)
    workers: int = 1  # a proxy case's `serve --workers N`
    args: tuple[str, ...] = ()  # a baseline case's arguments


# Adding a case is one line here.
CASES: tuple[Case, ...] = (
    Case("upstream", "upstream"),
    Case("baseline", "baseline"),
    # The same bare pass-through on access-proxy's upstream client: the forward path alone.
    Case("baseline-pool", "baseline", args=("--client", "pool")),
    Case("access-proxy", "proxy"),
    Case("access-proxy+rate-limit", "proxy", {"rate_limits": {"enabled": True}}),
    # Leases of 32 requests: a call every 16 to 32 requests instead of every 4 to 8.
    Case(
        "access-proxy+rate-limit-lease-32",
        "proxy",
        {"rate_limits": {"enabled": True, "lease_requests": 32}},
    ),
    # The same limits with a Redis call per request (no leases), for comparison.
    Case(
        "access-proxy+rate-limit-per-request",
        "proxy",
        {"rate_limits": {"enabled": True, "lease_requests": 0}},
    ),
    # The access log: off, and every request written to a file (the default logs denials only).
    Case("access-proxy+log-off", "proxy", {"access_log": {"mode": "off"}}),
    Case("access-proxy+log-all", "proxy", {"access_log": {"mode": "all", "path": "access.log"}}),
    # Two worker processes on one port, against the one-worker `access-proxy` case.
    Case("access-proxy --workers 2", "proxy", workers=2),
)
BASELINE = "baseline"


@dataclass(frozen=True, slots=True)
class Settings:
    rounds: int = 5
    duration_s: float = 5.0
    warmup_s: float = 1.0
    concurrencies: tuple[int, ...] = (1, 32)
    revocation_trials: int = 50
    decide_iterations: int = 200_000
    load: str = "auto"  # auto | wrk | python
    upstream: str = "auto"  # auto | nginx | mock


QUICK = Settings(
    rounds=1,
    duration_s=1.0,
    warmup_s=0.0,
    revocation_trials=5,
    decide_iterations=5_000,
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def median_known(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


class Processes:
    """Child processes of the run, each logging to a file, all stopped at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        self.running[name] = subprocess.Popen(
            list(cmd),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=self.workdir,
        )
        log.close()

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.workdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    async def wait_listening(self, name: str, port: int, timeout: float = 20.0) -> None:
        """Poll until ``port`` accepts a connection; fail early if the process died."""
        proc = self.running[name]
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} is not listening on {port}") from None
                await asyncio.sleep(0.02)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    def stop_all(self) -> None:
        for proc in self.running.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.running.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Seeded:
    key_id: str
    key: str


@dataclass
class Bench:
    settings: Settings
    workdir: Path
    procs: Processes
    redis: RedisServer
    writes: Writes
    peppers: identity.Peppers
    upstream_name: str
    load_name: str
    notes: list[str]
    urls: dict[str, str] = field(default_factory=dict)
    proxy_config: dict[str, Any] = field(default_factory=dict)
    config_paths: dict[str, Path] = field(default_factory=dict)
    seeded: Seeded | None = None


def nginx_command() -> str | None:
    return shutil.which("nginx")


def start_nginx(procs: Processes, workdir: Path, port: int, nginx: str) -> None:
    prefix = workdir / "nginx"
    prefix.mkdir()
    user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""
    text = (
        (HERE / "nginx.conf")
        .read_text()
        .replace("@USER_DIRECTIVE@", user)
        .replace("@PREFIX@", str(prefix))
        .replace("@PORT@", str(port))
        .replace("@COMPLETION@", CANNED_COMPLETION.replace("\\", "\\\\").replace("'", "\\'"))
    )
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    procs.spawn(
        "nginx", [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    )


def proxy_env(redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "REDIS_URL": redis_url,
            "ACCESS_PROXY_PEPPER": PEPPER,
            "UPSTREAM_API_KEY": UPSTREAM_API_KEY,
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def base_config(upstream_url: str, redis_url: str, state_dir: Path) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"listen": {"host": "127.0.0.1", "port": 0}},
        "redis": {"url": redis_url},
        "keys": {"pepper_env": "ACCESS_PROXY_PEPPER"},
        "state_dir": str(state_dir),
        "upstreams": {"models": {"url": upstream_url, "api_key_env": "UPSTREAM_API_KEY"}},
        "routes": [{"path_prefix": "/v1/", "product": PRODUCT, "upstream": "models"}],
        # Rate limiting is a case of its own (enabled there); its limits are never reached.
        "rate_limits": {"enabled": False, "default": UNLIMITED},
        "programs": {
            PROGRAM: {
                "models": ["gpt-5.6-sol", "gpt-5.6-terra", "gpt-5.6-luna"],
                "required_approvals": ["provider", "government"],
                "phases": {"api": "preview"},
            }
        },
    }


async def start_proxy(bench: Bench, name: str, over: Mapping[str, Any], workers: int = 1) -> str:
    """One ``access-proxy serve`` process; returns its data URL once it is ready."""
    port, admin_port = free_port(), free_port()
    cfg = merged(
        bench.proxy_config,
        {
            **over,
            "listen": {"host": "127.0.0.1", "port": port},
            "admin": {"listen": {"host": "127.0.0.1", "port": admin_port}},
        },
    )
    path = bench.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    bench.config_paths[name] = path
    cmd = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(path)]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    bench.procs.spawn(name, cmd, proxy_env(bench.redis.url))
    await bench.procs.wait_listening(name, admin_port)
    await bench.procs.wait_listening(name, port)
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as resp:
                    if resp.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} never became ready:\n{bench.procs.log_tail(name)}")
            await asyncio.sleep(0.05)
    return f"http://127.0.0.1:{port}"


async def seed(writes: Writes, peppers: identity.Peppers) -> Seeded:
    """An org, a workspace with an enabled grant for the preview program, and one key."""
    await writes.create_org(ACTOR, ORG_ID, "Benchmark org")
    await writes.create_workspace(ACTOR, WS_ID, ORG_ID, "Benchmark workspace")
    key_id, key = await writes.issue_key(ACTOR, WS_ID, "bench", peppers)
    grant = await writes.create_grant(ACTOR, PROGRAM, PRODUCT, f"workspace:{WS_ID}", None, None)
    for role in ("provider", "government"):
        reviewer = Actor(f"{role}-review", ACTOR.config_version)
        await writes.approve_grant(reviewer, grant.grant_id, role, f"{role}-reviewer")
    await writes.enable_grant(ACTOR, grant.grant_id, time.time() - 1)
    return Seeded(key_id, key)


async def post_status(session: aiohttp.ClientSession, url: str, key: str) -> int:
    async with session.post(
        url + PATH,
        data=CHAT_BODY,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    ) as resp:
        await resp.read()
        return resp.status


@contextlib.asynccontextmanager
async def started(settings: Settings) -> AsyncIterator[Bench]:
    """Everything the measurements need, running; stopped and removed on the way out."""
    workdir = Path(tempfile.mkdtemp(prefix="access-proxy-bench-"))
    procs = Processes(workdir)
    redis = RedisServer(workdir / "redis", persistent=False)
    notes: list[str] = []
    admin_client = None
    try:
        await redis.start()
        nginx = nginx_command()
        upstream_port = free_port()
        if settings.upstream in ("auto", "nginx") and nginx is not None:
            start_nginx(procs, workdir, upstream_port, nginx)
            upstream_name = "nginx (canned completion, 1 worker)"
            await procs.wait_listening("nginx", upstream_port)
        else:
            if settings.upstream == "nginx":
                raise RuntimeError("--upstream nginx: nginx is not on PATH")
            procs.spawn(
                "mock-upstream",
                [sys.executable, "-m", "proxy.mock_upstream", "--port", str(upstream_port)],
            )
            why = "nginx not found" if nginx is None else "chosen with --upstream mock"
            upstream_name = f"mock upstream (proxy.mock_upstream; {why})"
            notes.append(
                f"The upstream is the Python mock upstream ({why}); it may be the bottleneck, "
                "so the ratios can understate the proxies' headroom."
            )
            await procs.wait_listening("mock-upstream", upstream_port)
        upstream_url = f"http://127.0.0.1:{upstream_port}"

        wrk = loadgen.wrk_path()
        if settings.load == "wrk" and wrk is None:
            raise RuntimeError("--load wrk: wrk is not on PATH")
        if settings.load != "python" and wrk is not None:
            load_name = "wrk (1 thread)"
        else:
            load_name = "python (aiohttp, in the benchmark process)"
            notes.append(
                "The Python load generator shares the 2 cores with the servers it measures and "
                "is itself slower than they are: absolute numbers are lower than with wrk."
            )

        admin_client = make_client(redis.url, timeout_s=5.0)
        peppers = identity.parse_peppers(PEPPER)
        writes = Writes(admin_client)
        bench = Bench(
            settings, workdir, procs, redis, writes, peppers, upstream_name, load_name, notes
        )
        bench.proxy_config = base_config(upstream_url, redis.url, workdir / "state")
        bench.seeded = await seed(writes, peppers)
        bench.urls["upstream"] = upstream_url

        for case in CASES:
            if case.kind == "baseline":
                port = free_port()
                script = str(HERE / "baseline_proxy.py")
                procs.spawn(
                    case.name,
                    [
                        sys.executable,
                        script,
                        "--port",
                        str(port),
                        "--upstream",
                        upstream_url,
                        *case.args,
                    ],
                )
                await procs.wait_listening(case.name, port)
                bench.urls[case.name] = f"http://127.0.0.1:{port}"
            elif case.kind == "proxy":
                bench.urls[case.name] = await start_proxy(
                    bench, case.name, case.config, case.workers
                )
        bench.urls["revocation-peer"] = await start_proxy(bench, "revocation-peer", {})

        # Warm every path (and the proxies' caches) and check each answers 200. On a loaded
        # machine a first lookup may outlast the short Redis timeout (503): retry those a while.
        async with aiohttp.ClientSession() as session:
            for name, url in bench.urls.items():
                deadline = time.monotonic() + WARM_DEADLINE_S
                status = await post_status(session, url, bench.seeded.key)
                while status == 503 and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                    status = await post_status(session, url, bench.seeded.key)
                if status != 200:
                    raise RuntimeError(f"{name} answered {status} to the benchmark request")
        yield bench
    finally:
        procs.stop_all()
        if admin_client is not None:
            await admin_client.aclose()
        await redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------- throughput


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(proc: subprocess.Popen[bytes] | None) -> float | None:
    """User + system CPU time of ``proc`` (all its threads) and of its live children (the
    workers of ``--workers N``), from /proc; None where unknown."""
    if proc is None:
        return None
    try:
        pids = [proc.pid]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    if int(_stat(int(entry.name))[1]) == proc.pid:
                        pids.append(int(entry.name))
        ticks = sum(int(f[11]) + int(f[12]) for f in map(_stat, pids))
    except OSError:
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


async def measure(bench: Bench, case: Case, concurrency: int, duration_s: float) -> dict[str, Any]:
    """One load run; with the server's CPU time per answered request, a measure that a busy
    machine disturbs far less than the request rate."""
    assert bench.seeded is not None
    server = bench.procs.running.get(case.name)
    cpu_before = cpu_seconds(server)
    url = bench.urls[case.name] + PATH
    headers = {"Authorization": f"Bearer {bench.seeded.key}"}
    wrk = loadgen.wrk_path()
    if bench.load_name.startswith("wrk") and wrk is not None:
        script = loadgen.write_wrk_script(bench.workdir / "post.lua", CHAT_BODY, headers)
        result = await asyncio.to_thread(loadgen.run_wrk, url, script, concurrency, duration_s, wrk)
    else:
        result = await loadgen.run_python(url, CHAT_BODY, headers, concurrency, duration_s)
    out = dataclasses.asdict(result)
    cpu_after = cpu_seconds(server)
    spent = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    out["cpu_us_per_request"] = spent * 1e6 / out["requests"] if spent and out["requests"] else None
    return out


async def throughput(bench: Bench, log: Any) -> list[dict[str, Any]]:
    s = bench.settings
    samples: dict[tuple[str, int], list[dict[str, Any]]] = {}
    if s.warmup_s > 0:
        for c in s.concurrencies:
            for case in CASES:
                await measure(bench, case, c, s.warmup_s)
    for r in range(s.rounds):
        for c in s.concurrencies:
            # Alternate the order from round to round so no case always runs first.
            order = CASES if r % 2 == 0 else tuple(reversed(CASES))
            for case in order:
                one = await measure(bench, case, c, s.duration_s)
                samples.setdefault((case.name, c), []).append(one)
                log(
                    f"  round {r + 1}/{s.rounds} c={c:<3} {case.name:<36} "
                    f"{one['rps']:>9.0f} req/s  p50 {one['p50_ms']:.2f} ms  "
                    f"p99 {one['p99_ms']:.2f} ms"
                    + (f"  errors {one['errors']}" if one["errors"] else "")
                )
    rows: list[dict[str, Any]] = []
    for c in s.concurrencies:
        for case in CASES:
            runs = samples[(case.name, c)]
            rows.append(
                {
                    "case": case.name,
                    "kind": case.kind,
                    "concurrency": c,
                    "rps": median([x["rps"] for x in runs]),
                    "p50_ms": median([x["p50_ms"] for x in runs]),
                    "p99_ms": median([x["p99_ms"] for x in runs]),
                    "requests": sum(x["requests"] for x in runs),
                    "cpu_us_per_request": median_known([x["cpu_us_per_request"] for x in runs]),
                    "errors": sum(x["errors"] for x in runs),
                    "rounds": runs,
                }
            )
    base = {r["concurrency"]: r["rps"] for r in rows if r["case"] == BASELINE}
    for row in rows:
        b = base.get(row["concurrency"])
        compared = row["kind"] != "upstream" and row["case"] != BASELINE
        row["ratio_to_baseline"] = row["rps"] / b if compared and b else None
    return rows


# ---------------------------------------------------------------------- decision cost


async def decision_cost(bench: Bench) -> dict[str, Any]:
    """Microseconds per ``decide()`` on warm-cache facts, and per whole cache-hit path."""
    assert bench.seeded is not None
    cfg = config_mod.load(bench.config_paths[_first_proxy()])
    cc = dataclasses.replace(cfg.cache, ttl_seconds=3600.0)  # no expiry during the timing
    # Only the first lookups reach Redis (the timings run on a warm cache): a generous deadline
    # keeps a busy machine from failing them.
    client = make_client(bench.redis.url, timeout_s=5.0)
    try:
        gate = Gate(5.0, Breaker(cfg.redis.breaker_failures, cfg.redis.breaker_reset_s))
        ent = Entitlements(client, gate, FactCache(cfg.cache.max_entries))
        key_id, key = bench.seeded.key_id, bench.seeded.key
        rec = await ent.key(key_id, cc)
        assert rec is not None
        facts = await ent.facts_for(rec.workspace_id, cc)
        assert facts is not None
        req = RequestInfo(PRODUCT, MODEL)
        if not decide(facts, cfg, req, time.time()).allowed:
            raise RuntimeError("the seeded facts are not allowed: the benchmark setup is wrong")
        n = bench.settings.decide_iterations
        batches = 5
        per = max(1, n // batches)

        def decide_batch() -> float:
            now = time.time()
            start = time.perf_counter_ns()
            for _ in range(per):
                decide(facts, cfg, req, now)
            return (time.perf_counter_ns() - start) / per / 1000

        async def hit_batch(verify: bool) -> float:
            start = time.perf_counter_ns()
            for _ in range(per):
                r = await ent.key(key_id, cc)
                assert r is not None
                if verify:
                    identity.verify(bench.peppers, key, r.digest, r.pepper_version)
                f = await ent.facts_for(r.workspace_id, cc)
                assert f is not None
                decide(f, cfg, req, time.time())
            return (time.perf_counter_ns() - start) / per / 1000

        def read_batch(read: Any) -> float:
            start = time.perf_counter_ns()
            for _ in range(per):
                read()
            return (time.perf_counter_ns() - start) / per / 1000

        limit = cfg.limits.max_body_bytes
        ctypes = ["application/json"]

        def surfaces() -> object:
            path = "/v1/chat/completions"
            return named_models("POST", path, "", ctypes, (), CHAT_BODY, limit)

        decide_us = [decide_batch() for _ in range(batches)]
        models_us = [read_batch(surfaces) for _ in range(batches)]
        json_us = [read_batch(lambda: json.loads(CHAT_BODY)) for _ in range(batches)]
        hit_us = [await hit_batch(False) for _ in range(batches)]
        verify_us = [await hit_batch(True) for _ in range(batches)]
    finally:
        await client.aclose()
    return {
        "iterations": per * batches,
        "decide_us": median(decide_us),
        "request_models_us": median(models_us),
        "json_parse_us": median(json_us),
        "cache_hit_path_us": median(hit_us),
        "cache_hit_path_with_key_check_us": median(verify_us),
    }


# ---------------------------------------------------------------------- access log cost


async def access_log_cost(bench: Bench) -> dict[str, Any]:
    """Microseconds the access log adds per request: on the request path (the entry the handler
    fills, through the context variable, and ``submit``) with the log off and writing every
    request to a file, and in the writer thread per line (encoding and writing)."""
    n = max(1_000, bench.settings.decide_iterations // 4)
    base = config_mod.load(bench.config_paths[_first_proxy()]).access_log
    modes = {
        "off": dataclasses.replace(base, mode="off"),
        "all": dataclasses.replace(
            base, mode="all", path=str(bench.workdir / "access-cost.log"), queue_lines=n + 1
        ),
    }

    def request_path(settings: Any, writer: accesslog.AccessLog) -> float:
        start = time.perf_counter_ns()
        for i in range(n):
            entry = accesslog.Entry(time.time(), time.perf_counter())
            token = accesslog.current.set(entry)
            e = accesslog.current.get()  # as the handler does at each step it learns something
            assert e is not None
            e.request_id, e.settings = f"bench{i:08x}", settings
            e.key_id, e.org, e.workspace, e.model = "k", "o", "w", MODEL
            e.ttfb_ms, e.upstream_status = 1.0, 200
            e.tokens = {"input": 10, "cached_input": 0, "cache_write": 0, "output": 5}
            e.product, e.program, e.code = PRODUCT, "gpt-5.6-preview", "ok"
            accesslog.current.reset(token)
            e.status, e.duration_ms = 200, 2.0
            writer.submit(e)
        return (time.perf_counter_ns() - start) / n / 1000

    out: dict[str, Any] = {"iterations": n}
    for mode, settings in modes.items():
        # A writer not started: the request path alone, into an empty queue each time.
        runs = [request_path(settings, accesslog.AccessLog()) for _ in range(3)]
        out[f"request_path_{mode}_us"] = median(runs)
    writer = accesslog.AccessLog()
    request_path(modes["all"], writer)  # n entries queued as the handler leaves them
    start = time.perf_counter_ns()
    await asyncio.to_thread(lambda: (writer.start(), writer.stop(timeout=600)))
    out["writer_per_line_us"] = (time.perf_counter_ns() - start) / n / 1000
    return out


def _first_proxy() -> str:
    return next(c.name for c in CASES if c.kind == "proxy")


# ---------------------------------------------------------------------- revocation


async def revocation(bench: Bench) -> dict[str, Any]:
    """Per trial: a fresh key, cached by the peer process, revoked; time until the peer says 401."""
    url = bench.urls["revocation-peer"]
    delays_ms: list[float] = []
    polls: list[int] = []
    timeouts = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        for _ in range(bench.settings.revocation_trials):
            key_id, key = await bench.writes.issue_key(ACTOR, WS_ID, "revocation", bench.peppers)
            status = await post_status(session, url, key)
            if status != 200:
                raise RuntimeError(f"the peer answered {status} to a fresh key")
            await bench.writes.revoke_key(ACTOR, key_id)
            revoked = time.perf_counter()
            deadline = revoked + 10.0
            n = 0
            while True:
                n += 1
                status = await post_status(session, url, key)
                now = time.perf_counter()
                if status == 401:
                    delays_ms.append((now - revoked) * 1000)
                    polls.append(n)
                    break
                if now > deadline:
                    timeouts += 1
                    break
    return {
        "trials": bench.settings.revocation_trials,
        "refused": len(delays_ms),
        "timeouts": timeouts,
        "p50_ms": loadgen.percentile(delays_ms, 0.50),
        "p99_ms": loadgen.percentile(delays_ms, 0.99),
        "max_ms": max(delays_ms) if delays_ms else float("nan"),
        "median_polls": median([float(p) for p in polls]),
    }


# ---------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def render(result: Mapping[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"access-proxy benchmark, {result['date']}, {result['machine']['cores']} cores, "
        f"Python {result['machine']['python']}",
        f"load: {result['load_generator']}; upstream: {result['upstream']}",
        f"{s['rounds']} round(s) x {s['duration_s']:g} s per case, cases alternated; medians",
        "",
        f"{'conc':>4}  {'case':<36} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'ratio/baseline':>15} {'cpu us/req':>11} {'errors':>7}",
    ]
    for row in result["throughput"]:
        ratio = row["ratio_to_baseline"]
        lines.append(
            f"{row['concurrency']:>4}  {row['case']:<36} {row['rps']:>9.0f} "
            f"{row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} "
            f"{(f'{ratio:.2f}' if ratio is not None else '-'):>15} "
            f"{(f'{cpu:.0f}' if (cpu := row.get('cpu_us_per_request')) else '-'):>11} "
            f"{row['errors']:>7}"
        )
    t = result["targets"]
    d = result["decision"]
    rv = result["revocation"]
    a = result["access_log"]
    lines += [
        "",
        f"target: access-proxy / baseline >= {t['throughput_ratio_min']} (one worker)",
        "",
        f"decide() on a cache hit:           {d['decide_us']:7.2f} us per call "
        f"(target < {t['decide_us_max']:g} us)",
        f"models the chat body names (surfaces): {d['request_models_us']:7.2f} us "
        f"(its json.loads alone: {d['json_parse_us']:.2f} us)",
        f"cache-hit path (key + facts + decide): {d['cache_hit_path_us']:7.2f} us",
        f"  with the key check (HMAC):       {d['cache_hit_path_with_key_check_us']:7.2f} us",
        "",
        f"access log on the request path:    {a['request_path_off_us']:7.2f} us per request "
        f"with mode off, {a['request_path_all_us']:.2f} us writing every request",
        f"  its writer thread, per line:     {a['writer_per_line_us']:7.2f} us (encode + write)",
        "",
        f"revocation refused on a second process: p50 {rv['p50_ms']:.2f} ms, "
        f"p99 {rv['p99_ms']:.2f} ms, max {rv['max_ms']:.2f} ms over {rv['refused']} trials "
        f"(target p99 < {t['revocation_p99_ms_max']:g} ms)"
        + (f"; {rv['timeouts']} never refused within 10 s" if rv["timeouts"] else ""),
    ]
    if any(row["errors"] for row in result["throughput"]):
        lines.append("WARNING: some requests did not answer 200; the numbers above are suspect.")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


async def run(settings: Settings, log: Any) -> dict[str, Any]:
    async with started(settings) as bench:
        log(f"load: {bench.load_name}; upstream: {bench.upstream_name}")
        rows = await throughput(bench, log)
        log("decision cost")
        decision = await decision_cost(bench)
        log("access log cost")
        access_log = await access_log_cost(bench)
        log("revocation")
        revoked = await revocation(bench)
        return {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "settings": dataclasses.asdict(settings),
            "load_generator": bench.load_name,
            "upstream": bench.upstream_name,
            "cases": [dataclasses.asdict(c) for c in CASES],
            "throughput": rows,
            "decision": decision,
            "revocation": revoked,
            "access_log": access_log,
            "targets": TARGETS,
            "notes": bench.notes,
        }


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, bool]:
    p = argparse.ArgumentParser(description="Benchmark access-proxy against a bare proxy.")
    p.add_argument("--quick", action="store_true", help="one short round, a few trials")
    p.add_argument("--json", action="store_true", help="print the results as JSON only")
    p.add_argument("--rounds", type=int)
    p.add_argument("--duration", type=float, help="seconds per case and round")
    p.add_argument("--concurrency", type=int, nargs="+", help="connections (default 1 32)")
    p.add_argument("--revocation-trials", type=int)
    p.add_argument("--decide-iterations", type=int)
    p.add_argument("--load", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--upstream", choices=("auto", "nginx", "mock"), default="auto")
    args = p.parse_args(argv)
    s = QUICK if args.quick else Settings()
    s = dataclasses.replace(s, load=args.load, upstream=args.upstream)
    if args.rounds is not None:
        s = dataclasses.replace(s, rounds=max(1, args.rounds))
    if args.duration is not None:
        s = dataclasses.replace(s, duration_s=args.duration)
    if args.concurrency:
        s = dataclasses.replace(s, concurrencies=tuple(args.concurrency))
    if args.revocation_trials is not None:
        s = dataclasses.replace(s, revocation_trials=max(1, args.revocation_trials))
    if args.decide_iterations is not None:
        s = dataclasses.replace(s, decide_iterations=max(1, args.decide_iterations))
    return s, args.json


def json_ready(value: Any) -> Any:
    """``value`` with NaN (no samples) as null, so the output is strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, Mapping):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    settings, as_json = parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr if as_json else sys.stdout, flush=True)

    result = asyncio.run(run(settings, log))
    if as_json:
        print(json.dumps(json_ready(result), indent=2, allow_nan=False))
    else:
        print()
        print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
