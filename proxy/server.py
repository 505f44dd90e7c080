"""Process lifecycle for ``access-proxy serve``: Redis (embedded or external), the data and admin
listeners, the invalidation subscriber, signals, graceful drain, and ``--workers N``.

With ``--workers N`` a supervisor starts the embedded Redis (if any) and N worker processes that
share the data and admin ports with SO_REUSEPORT; Prometheus metrics then live in a shared
multiprocess directory and any worker's ``/metrics`` shows the merged view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy import config as config_mod
from proxy import env, eventloop, identity, metrics, startup
from proxy.accesslog import AccessLog
from proxy.admin.api import AdminContext, admin_app
from proxy.background import Task, every
from proxy.config import Config
from proxy.dataplane.admission import Admitter
from proxy.dataplane.app import DataPlane, Hooks
from proxy.dataplane.flags import FlagRecorder
from proxy.dataplane.forward import make_session
from proxy.dataplane.protocol import DataServer
from proxy.dataplane.websocket import Sessions
from proxy.metering import Meter
from proxy.redis_server import RedisServer
from proxy.reload import Reloader
from proxy.snapshot import Holder
from proxy.store.batchfiles import BatchFiles
from proxy.store.cache import FactCache
from proxy.store.connection import Gate
from proxy.store.entitlements import Entitlements
from proxy.store.invalidation import Subscriber
from proxy.store.migrate import migrate_when_reachable
from proxy.store.ratelimit import RateLimiter
from proxy.store.topology import Topology
from proxy.store.usage import UsageStore
from proxy.store.writes import Writes

log = logging.getLogger("access_proxy")


def embedded_redis(cfg: Config) -> RedisServer:
    return RedisServer(Path(cfg.state_dir) / "redis", persistent=True)


@dataclass
class Proxy:
    """One serving process: everything wired, started by ``start`` and drained by ``stop``."""

    holder: Holder
    redis_url: str
    peppers: identity.Peppers
    config_path: str | None = None
    embedded: RedisServer | None = None
    reuse_port: bool = False
    data_port: int | None = None
    admin_port: int | None = None
    draining: bool = False

    async def start(self) -> None:
        cfg = self.holder.current.config
        self.topology = Topology(self.redis_url)
        self.fast_redis = self.topology.client(cfg.redis.timeout_ms / 1000)
        self.admin_redis = self.topology.client(5.0, reconnect=True)
        self.sub_redis = self.topology.client(None)
        self.data_redis = self.topology.data_client(5.0)
        self.migration: asyncio.Task[None] | None = None
        if self.topology.kind != "cluster":
            # Before serving when Redis answers; else as soon as it does.
            self.migration = asyncio.create_task(migrate_when_reachable(self.admin_redis))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.migration), 2.0)
        self.cache: FactCache[Any] = FactCache(cfg.cache.max_entries)
        self.gate = Gate.of(cfg.redis)
        self.entitlements = Entitlements(self.fast_redis, self.gate, self.cache)
        self.writes = Writes(self.admin_redis)
        # A resubscribe shows Redis answering again: the breaker tries at once, so what changed
        # while this replica was cut off is read on the next lookup (SPEC §5).
        self.subscriber = Subscriber(
            self.sub_redis, self.cache, on_reconnect=self.gate.breaker.retry_now
        )
        self.subscriber.start()
        self.limiter = RateLimiter(
            self.fast_redis,
            self.gate,
            secrets.token_hex(6),
            resp=self.topology.resp(connect_timeout_s=1.0),
            lease_requests=cfg.rate_limits.lease_requests,
            lease_lifetime_s=cfg.rate_limits.lease_ms / 1000,
        )
        await self.limiter.start()
        self.flags = FlagRecorder(
            self.writes,
            lambda: self.holder.current.config.misuse,
            lambda: self.holder.current.config.version,
        )
        self.flags.start()
        self.session = make_session()
        # Open WebSocket sessions are decided again on every eviction and config swap.
        self.sessions = Sessions(self.holder, self.entitlements, self.session)
        self.subscriber.listeners.append(self.sessions.facts_evicted)
        self.sessions.start()
        self.reloader: Reloader | None = None
        if self.config_path is not None:
            self.reloader = Reloader(
                self.holder, self.config_path, redis=self.sub_redis, on_swap=self._config_swapped
            )
            await self.reloader.start()
        admitter = Admitter(self.session, self.limiter)
        hooks = Hooks(
            admit=admitter.admit,
            on_upstream_headers=self.flags.on_upstream_headers,
            websocket=self.sessions,
        )
        self.meter = Meter(
            UsageStore(self.data_redis),
            retention_days=lambda: self.holder.current.config.usage.retention_days,
        )
        self.meter.start()
        self.access_log = AccessLog()
        self.access_log.start()
        self.dataplane = DataPlane(
            self.holder,
            self.entitlements,
            self.peppers,
            self.session,
            hooks,
            self.meter,
            BatchFiles(self.admin_redis),
            access_log=self.access_log,
        )
        dataplane = self.dataplane
        copy = metrics.track_inflight(lambda: dataplane.inflight, env.multiproc_dir() is not None)
        self.inflight = Task(
            "inflight-gauge",
            lambda: every(1.0, copy or (lambda: None), "in-flight gauge", first_wait=False),
        )
        if copy is not None:
            self.inflight.start()

        # No access log on the data listener: no per-request logging on the hot path.
        server = DataServer(
            self.dataplane.handle,
            timeouts=self._client_timeouts,
            handler_cancellation=True,
            access_log=None,
        )
        self.data_runner = web.ServerRunner(
            server, shutdown_timeout=cfg.shutdown_grace_s, handle_signals=False
        )
        self.admin_runner = web.AppRunner(
            self._admin_app(), shutdown_timeout=5.0, handle_signals=False, access_log=None
        )
        await self.data_runner.setup()
        await self.admin_runner.setup()
        await self._bind(
            self.data_runner,
            "data listener",
            "listen.port",
            cfg.listen.host,
            self.data_port if self.data_port is not None else cfg.listen.port,
            backlog=1024,
        )
        await self._bind(
            self.admin_runner,
            "admin listener",
            "admin.listen.port",
            cfg.admin.listen.host,
            self.admin_port if self.admin_port is not None else cfg.admin.listen.port,
        )
        self.data_port = _bound_port(self.data_runner)
        self.admin_port = _bound_port(self.admin_runner)
        metrics.CONFIG_INFO.labels(cfg.version).set(1)

    def _client_timeouts(self) -> tuple[float, float]:
        """The slow-client limits for a new connection, from the live config."""
        limits = self.holder.current.config.limits
        return limits.client_header_timeout_s, limits.client_body_timeout_s

    async def _bind(
        self, runner: web.BaseRunner, what: str, setting: str, host: str, port: int, **kw: Any
    ) -> None:
        site = web.TCPSite(runner, host, port, reuse_port=self.reuse_port or None, **kw)
        try:
            await site.start()
        except OSError as exc:
            raise startup.bind_error(what, setting, host, port, exc) from None

    def _config_swapped(self, old: Config, new: Config) -> None:
        """Apply what lives outside the snapshot: the Redis deadline and breaker settings."""
        self.gate.configure(new.redis)
        self.sessions.config_swapped()
        log.info("config %s -> %s", old.version, new.version)

    async def _reload(self) -> dict[str, Any]:
        if self.reloader is None:
            return {"result": "error", "errors": [{"message": "no config file to reload"}]}
        return await self.reloader.admin_reload()

    def _admin_app(self) -> web.Application:
        usage = UsageStore(self.data_redis)
        app = admin_app(AdminContext(self.holder, self.writes, self.peppers, self._reload, usage))
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def redis_ok(self) -> bool:
        try:
            async with asyncio.timeout(0.5):
                return bool(await self.admin_redis.ping())
        except Exception:
            return False

    async def _readyz(self, request: web.Request) -> web.Response:
        version = self.holder.current.config.version
        redis_ok = await self.redis_ok()
        ready = redis_ok and not self.draining
        body = {
            "status": "ready" if ready else "not_ready",
            "config_version": version,
            "redis": "ok" if redis_ok else "unreachable",
            "invalidation": "subscribed" if self.subscriber.connected.is_set() else "down",
            "draining": self.draining,
            "event_loop": eventloop.running(),
        }
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=metrics.exposition(), headers={"content-type": CONTENT_TYPE_LATEST}
        )

    async def stop(self) -> None:
        """Turn /readyz to 503, stop accepting, drain in-flight requests (up to the grace)."""
        self.draining = True
        await self.sessions.stop()  # a session may last hours: it is ended, not drained
        await self.data_runner.cleanup()
        await self.inflight.stop()
        await self.admin_runner.cleanup()
        if self.reloader is not None:
            await self.reloader.stop()
        await self.flags.stop()
        await self.meter.stop()
        await self.limiter.stop()
        await self.subscriber.stop()
        await self.session.close()
        await asyncio.to_thread(self.access_log.stop)
        if self.migration is not None:
            self.migration.cancel()
        await self.topology.aclose()


def _bound_port(runner: web.BaseRunner) -> int:
    addrs = runner.addresses
    return int(addrs[0][1])


async def build_proxy(
    cfg: Config,
    *,
    redis_url: str | None = None,
    reuse_port: bool = False,
    config_path: str | None = None,
) -> Proxy:
    """Wire a Proxy for ``cfg``, starting the embedded Redis when the URL says so.

    Raises :class:`StartupError` (one line: cause and fix) for what an operator can fix.
    """
    url = redis_url or config_mod.redis_url(cfg)
    embedded_here = url == "embedded"
    # A worker of a supervisor that runs the embedded Redis shares its state directory.
    own_state = embedded_here or env.is_worker_of_embedded()
    pepper_here = own_state and not (env.secret(cfg.keys.pepper_env) or cfg.keys.pepper_file)
    if embedded_here or pepper_here:
        startup.state_dir(cfg.state_dir)
    startup.access_log_path(cfg.access_log)
    peppers = startup.peppers(cfg, cfg.state_dir if own_state else None)
    embedded: RedisServer | None = None
    if embedded_here:
        embedded = embedded_redis(cfg)
        await startup.start_embedded(embedded)
        url = embedded.url
    else:
        await startup.redis_reachable(url)
    return Proxy(
        Holder(cfg),
        url,
        peppers,
        config_path=config_path,
        embedded=embedded,
        reuse_port=reuse_port,
    )


async def serve(cfg: Config, *, worker: bool = False) -> int:
    # Signals first: a stop during startup drains right after it; a SIGHUP before the reloader
    # exists is moot, since the reloader reads the file when it starts.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    proxy = await build_proxy(cfg, reuse_port=worker, config_path=cfg.source)
    try:
        await proxy.start()
    except BaseException:
        with contextlib.suppress(Exception):  # a partial start: the first error is the one
            await proxy.stop()
        if proxy.embedded is not None:
            await proxy.embedded.stop()
        raise
    log.info(
        "access-proxy serving: data %s:%s, admin %s:%s, config %s",
        cfg.listen.host,
        proxy.data_port,
        cfg.admin.listen.host,
        proxy.admin_port,
        cfg.version,
    )
    if proxy.reloader is not None:
        proxy.reloader.install_sighup(loop)
    loop.add_signal_handler(signal.SIGUSR1, proxy.access_log.reopen)
    await stop.wait()
    log.info("draining (grace %.0fs)", cfg.shutdown_grace_s)
    await proxy.stop()
    if proxy.embedded is not None:
        await proxy.embedded.stop()
    return 0


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


def configure_logging() -> None:
    logging.basicConfig(
        level=env.log_level(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def run_serve(config_path: str | None, workers: int) -> int:
    configure_logging()
    try:
        cfg = config_mod.load(config_path)
    except config_mod.ConfigError as exc:
        return startup.fail(startup.invalid_config(exc))
    path = cfg.source
    try:
        if workers > 1 and not env.is_worker():
            return supervise(cfg, path, workers)
        return eventloop.run(serve(cfg, worker=env.is_worker()))
    except eventloop.LoopUnavailable as exc:
        return startup.fail(startup.StartupError(str(exc), eventloop.FIX))
    except startup.StartupError as exc:
        return startup.fail(exc)
