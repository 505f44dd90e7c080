"""Hot config reload (SPEC §8): one path for every trigger — ``SIGHUP``, the admin call, a change
of the file on disk, and a reload announced by another worker over Redis.

A reload reads the file, validates all of it, keeps the settings declared restart-only (listen
addresses, Redis URL, state directory) from the running config, and swaps the new snapshot in with
one assignment; requests in flight keep the snapshot they started with. An invalid file changes
nothing: every error is logged with its location and counted, and the old snapshot keeps serving.

With several worker processes every worker reloads: the supervisor forwards ``SIGHUP`` to all of
them, each watches the file, and an admin call (which reaches one worker) is published on the
Redis channel ``ap:reload`` so every other worker and replica sharing that Redis reloads too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from proxy import config, configdiff, metrics
from proxy.background import every
from proxy.config import Config, ConfigError, ConfigIssue
from proxy.snapshot import Holder
from proxy.store.pubsub import subscribe_forever
from proxy.store.schema import RELOAD_CHANNEL

log = logging.getLogger(__name__)

PEER_ACK_TIMEOUT_S = 2.0
# A file changed this recently may be written again within the same timestamp tick without its
# size changing, so its content is compared as well (git's "racily clean" rule).
_RACY_S = 2.0

FileSignature = tuple[str, int, int, int, int]


@dataclass(frozen=True)
class ReloadResult:
    result: str  # "ok" | "unchanged" | "error"
    version: str  # the active version after the attempt
    errors: list[dict[str, Any]] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    restart_required: list[str] = field(default_factory=list)
    peers_asked: int = 0  # other workers and replicas that received the announcement
    peers_confirmed: int = 0  # of those, the ones that answered running this version

    @property
    def status(self) -> int:
        """The HTTP status of the admin answer: 422 when the file was rejected."""
        return 422 if self.result == "error" else 200

    def as_json(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "version": self.version,
            "errors": list(self.errors),
            "changes": list(self.changes),
            "restart_required": list(self.restart_required),
            "peers": {"asked": self.peers_asked, "confirmed": self.peers_confirmed},
        }


def show_version(old: str | None, new: str) -> None:
    """Make ``access_proxy_config_info`` name ``new`` alone."""
    metrics.CONFIG_INFO.labels(new).set(1)
    if old is None or old == new:
        return
    # In multiprocess mode a label cannot be removed from the shared file, so zero it first.
    metrics.CONFIG_INFO.labels(old).set(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        metrics.CONFIG_INFO.remove(old)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        issue = ConfigIssue("", f"cannot read file: {exc.strerror}")
        raise ConfigError(path, [issue]) from None


def _signature(path: str) -> FileSignature | None:
    """What identifies the file's current content cheaply; follows symlinks (ConfigMap swaps)."""
    try:
        st = os.stat(path)
        real = os.path.realpath(path)
    except OSError:
        return None
    return (real, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Reloader:
    """Reloads the config at ``path`` into ``holder`` on every trigger."""

    def __init__(
        self,
        holder: Holder,
        path: str,
        *,
        redis: aioredis.Redis | None = None,
        on_swap: Callable[[Config, Config], None] | None = None,
        poll_interval: float = 0.25,
    ) -> None:
        self.holder = holder
        self.path = path
        self.redis = redis
        self.on_swap = on_swap
        self.poll_interval = poll_interval
        self.origin = uuid.uuid4().hex
        self.subscribed = asyncio.Event()
        self.last_result: ReloadResult | None = None
        self._lock = threading.Lock()
        self._seen_digest: str | None = None  # the content last tried, valid or not
        self._seen_signature: FileSignature | None = None
        self._missing_logged = False
        self._tasks: list[asyncio.Task[None]] = []
        self._sighup_loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[str, asyncio.Queue[str]] = {}  # our announcements awaiting acks
        self._acks: set[asyncio.Future[int]] = set()

    @property
    def version(self) -> str:
        return self.holder.current.config.version

    # ------------------------------------------------------------------ the one reload path

    def reload(self, trigger: str) -> ReloadResult:
        """Read, validate and swap in the file now; an invalid file changes nothing."""
        try:
            text = _read(self.path)
        except ConfigError as exc:
            with self._lock:
                return self._reject(trigger, exc)
        return self._apply(trigger, text, quiet_if_unchanged=False)

    def _apply(self, trigger: str, text: str, *, quiet_if_unchanged: bool) -> ReloadResult:
        with self._lock:
            self._seen_digest = _digest(text)
            try:
                new = config.parse(text, self.path)
            except ConfigError as exc:
                return self._reject(trigger, exc)
            running = self.holder.current.config
            changes = configdiff.diff(running, new)
            applied = [configdiff.format_changes([c]) for c in changes if not c.restart_required]
            held = [configdiff.format_changes([c]) for c in changes if c.restart_required]
            if new.version == running.version:
                result = ReloadResult("unchanged", running.version, [], [], held)
                # An asked-for reload that finds nothing new still succeeded; the watcher's
                # look at a file whose content is already active is not a reload at all.
                if not quiet_if_unchanged:
                    metrics.CONFIG_RELOADS.labels("ok").inc()
                    log.info("config reload (%s): unchanged, version %s", trigger, new.version)
                self.last_result = result
                return result
            active = config.keep_restart_only(running, new)
            try:
                self.holder.swap(active)
            except Exception as exc:  # a snapshot that cannot be built is a rejected file
                issue = ConfigIssue("", f"cannot build the snapshot: {exc}")
                return self._reject(trigger, ConfigError(self.path, [issue]))
            show_version(running.version, active.version)
            metrics.CONFIG_RELOADS.labels("ok").inc()
            log.info(
                "config reload (%s): version %s -> %s, %d changes",
                trigger,
                running.version,
                active.version,
                len(applied),
            )
            for line in applied:
                log.info("config change: %s", line)
            for line in held:
                log.warning("config change not applied: %s", line)
            result = ReloadResult("ok", active.version, [], applied, held)
            self.last_result = result
        if self.on_swap is not None:
            try:
                self.on_swap(running, active)
            except Exception:
                log.exception("config reload (%s): on_swap failed", trigger)
        return result

    def _reject(self, trigger: str, exc: ConfigError) -> ReloadResult:
        metrics.CONFIG_RELOADS.labels("error").inc()
        log.error(
            "config reload (%s) rejected, keeping version %s: %d errors",
            trigger,
            self.version,
            len(exc.issues),
        )
        for issue in exc.issues:
            log.error("config error: %s", issue.format(exc.source))
        result = ReloadResult("error", self.version, exc.as_list(), [], [])
        self.last_result = result
        return result

    # ------------------------------------------------------------------ every worker

    async def reload_everywhere(self, trigger: str) -> ReloadResult:
        """Reload here, then ask every other worker and replica on this Redis to do the same,
        and wait (up to ``PEER_ACK_TIMEOUT_S``) until each says it runs the new version, so the
        next request after the answer is decided under it wherever it lands."""
        result = self.reload(trigger)
        if self.redis is None or result.result == "error":
            return result
        ask = uuid.uuid4().hex
        acks: asyncio.Queue[str] = asyncio.Queue()
        self._waiting[ask] = acks
        message = {
            "kind": "reload",
            "origin": self.origin,
            "ask": ask,
            "trigger": trigger,
            "version": result.version,
        }
        try:
            receivers = await self.redis.publish(RELOAD_CHANNEL, json.dumps(message))
            asked = max(0, receivers - (1 if self.subscribed.is_set() else 0))
            confirmed = 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PEER_ACK_TIMEOUT_S):
                    for _ in range(asked):
                        confirmed += await acks.get() == result.version
        except Exception as exc:  # the others still see the file change by watching it
            log.warning("could not announce the reload on %s: %s", RELOAD_CHANNEL, exc)
            return result
        finally:
            del self._waiting[ask]
        return dataclasses.replace(result, peers_asked=asked, peers_confirmed=confirmed)

    async def admin_reload(self) -> dict[str, Any]:
        """The admin call's reload: everywhere, answered as JSON (``result`` "error" → 422)."""
        return (await self.reload_everywhere("admin")).as_json()

    def _on_message(self, data: bytes | str) -> None:
        try:
            message = json.loads(data)
            origin = message["origin"]
            kind = message.get("kind", "reload")
        except (ValueError, TypeError, KeyError, AttributeError):
            log.warning("ignoring a malformed message on %s", RELOAD_CHANNEL)
            return
        if kind == "ack":
            waiting = self._waiting.get(message.get("ask", ""))
            if origin == self.origin and waiting is not None:
                waiting.put_nowait(str(message.get("version")))
        elif origin != self.origin:
            result = self.reload("peer")
            if "ask" in message and self.redis is not None:
                ack = {"kind": "ack", "origin": origin, "ask": message["ask"]}
                ack["version"] = result.version
                task = asyncio.ensure_future(self.redis.publish(RELOAD_CHANNEL, json.dumps(ack)))
                self._acks.add(task)
                task.add_done_callback(self._acks.discard)

    # ------------------------------------------------------------------ background triggers

    async def start(self) -> None:
        """Watch the file, and listen for reloads announced on Redis when a client was given."""
        self.check_file("start")  # the file may have changed since the running config was read
        watch = every(lambda: self.poll_interval, self.check_file, "config file watch")
        self._tasks.append(asyncio.create_task(watch, name="config-watch"))
        if self.redis is not None:
            self._tasks.append(asyncio.create_task(self._subscribe(), name="config-reload-sub"))

    async def stop(self) -> None:
        if self._sighup_loop is not None:
            with contextlib.suppress(Exception):
                self._sighup_loop.remove_signal_handler(signal.SIGHUP)
            self._sighup_loop = None
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.subscribed.clear()

    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reload this process on SIGHUP (a supervisor forwards the signal to every worker)."""
        loop.add_signal_handler(signal.SIGHUP, self.reload, "sighup")
        self._sighup_loop = loop

    def check_file(self, trigger: str = "file") -> ReloadResult | None:
        """Reload if the file's content changed since it was last tried; None when it did not."""
        signature = _signature(self.path)
        if signature is None:
            if not self._missing_logged:
                log.warning(
                    "config file %s is missing; keeping version %s", self.path, self.version
                )
                self._missing_logged = True
            self._seen_signature = None
            return None
        self._missing_logged = False
        racy = time.time() - signature[3] / 1e9 < _RACY_S
        if signature == self._seen_signature and not racy:
            return None
        self._seen_signature = signature
        try:
            text = _read(self.path)
        except ConfigError:
            return None  # gone again between stat and read; the next poll sees it
        if _digest(text) == self._seen_digest:
            return None
        return self._apply(trigger, text, quiet_if_unchanged=True)

    async def _subscribe(self) -> None:
        assert self.redis is not None
        # Announcements made while unsubscribed are lost: look at the file instead.
        await subscribe_forever(
            self.redis,
            RELOAD_CHANNEL,
            on_subscribed=lambda: self.check_file("resubscribe"),
            on_message=self._on_message,
            connected=self.subscribed,
            what="reload",
        )
