"""``access-proxy serve``: wire one serving process (``Proxy``: Redis clients, the fact cache,
the data plane and its hooks, the reloader, the data and admin listeners), start it, and drain
it on SIGTERM. Health and metrics routes are in ``health``, the ``--workers N`` supervisor in
``supervisor``, logging in ``logsetup``, the one-line start-up failures in ``startup``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import secrets
import signal
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from proxy import config as config_mod
from proxy import env, eventloop, identity, metrics, startup
from proxy.accesslog import AccessLog
from proxy.admin.api import AdminContext, admin_app
from proxy.background import Task, every
from proxy.config import Config
from proxy.dataplane.admission import Admitter
from proxy.dataplane.app import DataPlane, Hooks
from proxy.dataplane.client import UpstreamPool
from proxy.dataplane.flags import FlagRecorder
from proxy.dataplane.forward import make_session
from proxy.dataplane.protocol import DataServer
from proxy.dataplane.websocket import Sessions
from proxy.health import Health
from proxy.logsetup import configure_logging
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
from proxy.store.topology import AnyRedis, Topology
from proxy.store.usage import UsageStore
from proxy.store.writes import Writes
from proxy.supervisor import embedded_redis, supervise

log = logging.getLogger("access_proxy")


@dataclass
class Proxy:
    """One serving process: everything wired, started by ``start`` and drained by ``stop``.

    The fields after ``draining`` exist once ``start`` has run."""

    holder: Holder
    redis_url: str
    peppers: identity.Peppers
    config_path: str | None = None
    embedded: RedisServer | None = None
    reuse_port: bool = False
    data_port: int | None = None
    admin_port: int | None = None
    draining: bool = False
    # Redis: the clients of each use, and the schema migration of a single-node layout.
    topology: Topology = field(init=False, repr=False)
    fast_redis: aioredis.Redis = field(init=False, repr=False)  # hot path: short deadline
    admin_redis: aioredis.Redis = field(init=False, repr=False)  # audited writes, admin reads
    sub_redis: aioredis.Redis = field(init=False, repr=False)  # pub/sub: no deadline
    data_redis: AnyRedis = field(init=False, repr=False)  # usage counters, per workspace
    migration: asyncio.Task[None] | None = field(init=False, repr=False, default=None)
    # Facts, their cache and the writes that change them.
    cache: FactCache[Any] = field(init=False, repr=False)
    gate: Gate = field(init=False, repr=False)
    entitlements: Entitlements = field(init=False, repr=False)
    writes: Writes = field(init=False, repr=False)
    subscriber: Subscriber = field(init=False, repr=False)
    # The data plane and what plugs into it.
    limiter: RateLimiter = field(init=False, repr=False)
    flags: FlagRecorder = field(init=False, repr=False)
    session: aiohttp.ClientSession = field(init=False, repr=False)
    sessions: Sessions = field(init=False, repr=False)
    reloader: Reloader | None = field(init=False, repr=False, default=None)
    meter: Meter = field(init=False, repr=False)
    access_log: AccessLog = field(init=False, repr=False)
    dataplane: DataPlane = field(init=False, repr=False)
    inflight: Task = field(init=False, repr=False)
    # The listeners.
    health: Health = field(init=False, repr=False)
    data_runner: web.ServerRunner = field(init=False, repr=False)
    admin_runner: web.AppRunner = field(init=False, repr=False)

    async def start(self) -> None:
        cfg = self.holder.current.config
        await self._connect(cfg)
        self._stores(cfg)
        await self._data_plane()
        await self._listen(cfg)
        metrics.CONFIG_INFO.labels(cfg.version).set(1)

    async def _connect(self, cfg: Config) -> None:
        """Redis clients for each use; a single-node layout is migrated before serving when
        Redis answers, else as soon as it does."""
        self.topology = Topology(self.redis_url)
        self.fast_redis = self.topology.client(cfg.redis.timeout_ms / 1000)
        self.admin_redis = self.topology.client(5.0, reconnect=True)
        self.sub_redis = self.topology.client(None)
        self.data_redis = self.topology.data_client(5.0)
        if self.topology.kind != "cluster":
            self.migration = asyncio.create_task(migrate_when_reachable(self.admin_redis))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.migration), 2.0)

    def _stores(self, cfg: Config) -> None:
        """The fact cache behind the deadline and breaker, the writes, and the subscription
        that evicts what other replicas change."""
        self.cache = FactCache(cfg.cache.max_entries)
        self.gate = Gate.of(cfg.redis)
        self.entitlements = Entitlements(self.fast_redis, self.gate, self.cache)
        self.writes = Writes(self.admin_redis)
        # A resubscribe shows Redis answering again: the breaker tries at once, so what changed
        # while this replica was cut off is read on the next lookup (SPEC §5).
        self.subscriber = Subscriber(
            self.sub_redis, self.cache, on_reconnect=self.gate.breaker.retry_now
        )
        self.subscriber.start()

    async def _data_plane(self) -> None:
        """The handler and its hooks: rate limits, safety flags, WebSocket sessions, metering,
        the access log, and the config reloader."""
        cfg = self.holder.current.config
        self.limiter = RateLimiter(
            self.fast_redis,
            self.gate,
            secrets.token_hex(6),
            resp=self.topology.resp(connect_timeout_s=1.0),
            lease_requests=cfg.rate_limits.lease_requests,
            lease_lifetime_s=cfg.rate_limits.lease_ms / 1000,
        )
        await self.limiter.start()
        live = self.holder
        self.flags = FlagRecorder(
            self.writes, lambda: live.current.config.misuse, lambda: live.current.config.version
        )
        self.flags.start()
        self.session = make_session()  # WebSocket upstreams and the classifier
        self.pool = UpstreamPool()  # every other upstream request
        # Open WebSocket sessions are decided again on every eviction and config swap.
        self.sessions = Sessions(self.holder, self.entitlements, self.session)
        self.subscriber.listeners.append(self.sessions.facts_evicted)
        self.sessions.start()
        if self.config_path is not None:
            self.reloader = Reloader(
                self.holder, self.config_path, redis=self.sub_redis, on_swap=self._config_swapped
            )
            await self.reloader.start()
        hooks = Hooks(
            admit=Admitter(self.session, self.limiter).admit,
            on_upstream_headers=self.flags.on_upstream_headers,
            websocket=self.sessions,
        )
        self.meter = Meter(
            UsageStore(self.data_redis),
            retention_days=lambda: live.current.config.usage.retention_days,
        )
        self.meter.start()
        self.access_log = AccessLog()
        self.access_log.start()
        self.dataplane = DataPlane(
            self.holder,
            self.entitlements,
            self.peppers,
            self.pool,
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

    async def _listen(self, cfg: Config) -> None:
        """Bind the data and the admin listener (health and metrics beside the admin API)."""
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
        self.health = Health(
            self.holder, self.admin_redis, self.subscriber.connected, lambda: self.draining
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
        self.health.add_routes(app)
        return app

    async def redis_ok(self) -> bool:
        return await self.health.redis_ok()

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
        await self.pool.close()
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
    # What start-up built lives as long as the process: kept out of the cyclic collector, whose
    # full passes would otherwise walk all of it again every few seconds under load.
    gc.collect()
    gc.freeze()
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
