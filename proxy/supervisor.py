"""``serve --workers N``: a supervisor process that checks what the workers need, starts the
embedded Redis (if any) and N worker processes sharing the data and admin ports (SO_REUSEPORT),
forwards signals to them, and stops Redis last. Prometheus metrics then live in a shared
multiprocess directory, so any worker's ``/metrics`` shows the merged view.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from proxy import config as config_mod
from proxy import env, startup
from proxy.config import Config
from proxy.redis_server import RedisServer


def embedded_redis(cfg: Config) -> RedisServer:
    """The embedded Redis of ``cfg``: persistent, in the state directory."""
    return RedisServer(Path(cfg.state_dir) / "redis", persistent=True)


def supervise(cfg: Config, config_path: str, workers: int) -> int:
    """Run ``workers`` serve processes on shared ports; forward signals; stop Redis last."""
    redis: RedisServer | None = None
    url = config_mod.redis_url(cfg)
    embedded = url == "embedded"
    if embedded:
        startup.state_dir(cfg.state_dir)
    startup.access_log_path(cfg.access_log)
    startup.peppers(cfg, cfg.state_dir if embedded else None)
    # The workers bind with SO_REUSEPORT, which would share a port another process holds.
    startup.port_free("data listener", "listen.port", cfg.listen.host, cfg.listen.port)
    startup.port_free(
        "admin listener", "admin.listen.port", cfg.admin.listen.host, cfg.admin.listen.port
    )
    if embedded:
        redis = embedded_redis(cfg)
        startup.start_embedded_sync(redis)
    else:
        asyncio.run(startup.redis_reachable(url))
    multiproc = tempfile.mkdtemp(prefix="access-proxy-metrics-")
    worker_env = env.worker_environment(redis.url if redis is not None else None, multiproc)
    cmd = [sys.executable, "-m", "proxy.cli", "serve", "--config", config_path, "--workers", "1"]
    procs: list[subprocess.Popen[bytes]] = []
    stop_signals: list[int] = []

    def forward(sig: int, _frame: Any) -> None:
        if sig not in (signal.SIGHUP, signal.SIGUSR1):
            stop_signals.append(sig)
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    # Handlers first: a signal that arrives while the workers start must not kill the
    # supervisor (the default action) and leave them running; a stop reaches the late ones too.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, forward)
    for _ in range(workers):
        procs.append(subprocess.Popen(cmd, env=worker_env))
    if stop_signals:
        forward(stop_signals[0], None)
    code = 0
    try:
        while True:
            alive = [p for p in procs if p.poll() is None]
            if not alive:
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                alive[0].wait(timeout=0.5)
        # A worker killed by a signal has a negative code: that is a failure too.
        code = next((1 for p in procs if p.returncode), 0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if redis is not None:
            redis.stop_sync()
        for f in Path(multiproc).glob("*.db"):
            f.unlink()
        with contextlib.suppress(OSError):
            Path(multiproc).rmdir()
    return code
