"""The access log (SPEC §11): one JSON line per request, written off the request path.

The handler fills an :class:`Entry` as the request goes and hands it to :meth:`AccessLog.submit`
when the answer is done. ``submit`` applies the mode and the sampling (allowed requests only;
denials are never sampled) and appends the entry to a queue bounded by ``queue_lines``, or
counts it in ``access_proxy_access_log_dropped_total`` when the queue is full: no I/O, no lock,
no encoding on the request path. A writer thread encodes the queued entries and writes them in
batches to ``stderr`` or a file; a slow or blocked sink stalls only that thread, and the queue's
bound turns the backlog into counted drops. ``reopen()`` (SIGUSR1) makes the writer reopen its
file before the next batch, for log rotation.

An entry holds ids, names, codes and numbers: never a key (only its public ``key_id``), a body,
or the upstream credential.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import threading
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime

from proxy import metrics
from proxy.config import AccessLogConfig

log = logging.getLogger(__name__)

STDERR = "stderr"
_BATCH = 512
_IDLE_S = 0.02  # the writer's nap when the queue is empty (no wake-up cost per request)
_MODEL_CHARS = 200  # a client-chosen model name is cut to this length


@dataclass(slots=True)
class Entry:
    """What one request leaves in the log, filled in as the handler learns it."""

    ts: float  # wall clock at the start
    started: float  # perf_counter at the start
    settings: AccessLogConfig | None = None  # from the request's config snapshot
    request_id: str | None = None
    product: str | None = None
    program: str | None = None
    model: str | None = None
    org: str | None = None
    workspace: str | None = None
    key_id: str | None = None
    code: str | None = None
    status: int | None = None
    duration_ms: float | None = None
    ttfb_ms: float | None = None
    upstream_status: int | None = None
    tokens: dict[str, int] | None = None

    def line(self) -> bytes:
        when = datetime.fromtimestamp(self.ts, UTC).isoformat(timespec="milliseconds")
        model = self.model
        if model is not None and len(model) > _MODEL_CHARS:
            model = model[:_MODEL_CHARS]
        doc = {
            "ts": when.replace("+00:00", "Z"),
            "request_id": self.request_id,
            "product": self.product,
            "program": self.program,
            "model": model,
            "org": self.org,
            "workspace": self.workspace,
            "key_id": self.key_id,
            "code": self.code,
            "status": self.status,
            "duration_ms": _ms(self.duration_ms),
            "ttfb_ms": _ms(self.ttfb_ms),
            "upstream_status": self.upstream_status,
            "tokens": self.tokens,
        }
        return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# The entry of the request being handled (each request runs in a task of its own).
current: ContextVar[Entry | None] = ContextVar("access_log_entry", default=None)


class AccessLog:
    """The bounded queue and the writer thread behind it."""

    def __init__(self) -> None:
        self._queue: deque[Entry] = deque()
        self._reopen = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._fd_path: str | None = None
        self._failing: str | None = None  # the sink's last error, logged once per streak

    # ------------------------------------------------------------------ the request path

    def submit(self, entry: Entry) -> None:
        """Queue ``entry`` if its settings log it; count it dropped when the queue is full."""
        settings = entry.settings
        if settings is None or settings.mode == "off":
            return
        if entry.code == "ok":
            if settings.mode != "all":
                return
            if settings.sample < 1.0 and random.random() >= settings.sample:
                return
        if len(self._queue) >= settings.queue_lines:
            metrics.ACCESS_LOG_DROPPED.inc()
            return
        self._queue.append(entry)

    def reopen(self) -> None:
        """Reopen the file before the next write (SIGUSR1, after a rotation moved it)."""
        self._reopen = True

    # ------------------------------------------------------------------ the writer

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Write what is queued (for up to ``timeout``) and close the file."""
        self._stopping.set()
        if self._thread is not None:
            # A writer blocked on a stuck sink is left behind (daemon thread).
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            if not self._queue:
                if self._stopping.is_set():
                    break
                self._stopping.wait(_IDLE_S)
                continue
            batch = [self._queue.popleft() for _ in range(min(_BATCH, len(self._queue)))]
            start = 0
            for i in range(1, len(batch) + 1):
                # One write per run of entries bound for the same path (a reload may move it).
                if i == len(batch) or _path(batch[i]) != _path(batch[start]):
                    self._write(_path(batch[start]), batch[start:i])
                    start = i
        self._close()

    def _write(self, path: str, entries: list[Entry]) -> None:
        data = b"".join(e.line() for e in entries)
        try:
            fd = self._sink(path)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            metrics.ACCESS_LOG_DROPPED.inc(len(entries))
            self._close()  # reopened on the next batch
            problem = f"{path}: {exc.strerror or exc}"
            if problem != self._failing:
                self._failing = problem
                if exc.errno != errno.EPIPE:
                    log.warning("access log: cannot write %s; dropping lines", problem)
            return
        self._failing = None

    def _sink(self, path: str) -> int:
        if self._reopen or path != self._fd_path:
            self._reopen = False
            self._close()
        if self._fd is None:
            if path == STDERR:
                self._fd = 2
            else:
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                self._fd = os.open(path, flags, 0o640)
            self._fd_path = path
        return self._fd

    def _close(self) -> None:
        fd, self._fd, self._fd_path = self._fd, None, None
        if fd is not None and fd != 2:
            with contextlib.suppress(OSError):
                os.close(fd)


def _path(entry: Entry) -> str:
    return entry.settings.path if entry.settings is not None else STDERR
