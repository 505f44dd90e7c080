"""Misuse flags from the upstream's safety header (SPEC §6), recorded off the request path.

The header (``misuse.upstream_flag_header``, value ``category[;severity=N]``) is read and stripped
as soon as the upstream's headers arrive, before any byte reaches the client. The flag is queued
to a background recorder, so it is kept even if the client disconnects; a write that fails while
Redis is away stays queued and is retried until it lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

from multidict import CIMultiDictProxy

from proxy.background import Backoff, Task
from proxy.config import MisuseConfig
from proxy.policy.facts import Facts
from proxy.policy.standing import Flag
from proxy.snapshot import Snapshot
from proxy.store.writes import Actor, StoreError, Writes

log = logging.getLogger(__name__)

MAX_SEVERITY = 100


def parse_flag_header(value: str, now: float) -> Flag | None:
    """``cyber;severity=2`` → Flag(cyber, 2). A bare category has severity 1."""
    category, *params = (part.strip() for part in value.split(";"))
    if not category or len(category) > 64:
        return None
    severity = 1
    for param in params:
        name, _, raw = param.partition("=")
        if name.strip().lower() == "severity":
            try:
                severity = int(raw.strip())
            except ValueError:
                return None
    if not 1 <= severity <= MAX_SEVERITY:
        return None
    return Flag(at=now, category=category.lower(), severity=severity, source="upstream")


class FlagRecorder:
    """A queue of (workspace, flag) writes drained by one task, retried until Redis takes them."""

    def __init__(
        self, writes: Writes, misuse: Callable[[], MisuseConfig], version: Callable[[], str]
    ) -> None:
        self.writes = writes
        self.misuse = misuse
        self.version = version
        self._queue: deque[tuple[str, Flag]] = deque()
        self._wake = asyncio.Event()
        self._task = Task("flag-recorder", self._run)

    def start(self) -> None:
        self._task.start()

    async def stop(self, flush_timeout: float = 2.0) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(flush_timeout):
                while self._queue:
                    self._wake.set()
                    await asyncio.sleep(0.02)
        await self._task.stop()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def record(self, workspace_id: str, flag: Flag) -> None:
        self._queue.append((workspace_id, flag))
        self._wake.set()

    def on_upstream_headers(
        self, snap: Snapshot, facts: Facts, headers: CIMultiDictProxy[str]
    ) -> None:
        value = headers.get(snap.config.misuse.upstream_flag_header)
        if value is None:
            return
        flag = parse_flag_header(value, time.time())
        if flag is None:
            log.warning("ignoring malformed safety flag header %r", value[:100])
            return
        self.record(facts.workspace.workspace_id, flag)

    async def _run(self) -> None:
        backoff = Backoff()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                ws, flag = self._queue[0]
                try:
                    await self.writes.add_flag(
                        Actor("upstream", self.version()), ws, flag, self.misuse()
                    )
                except StoreError as exc:  # the workspace is gone: nothing to attach it to
                    log.warning("dropping flag for %s: %s", ws, exc.message)
                except Exception as exc:
                    log.warning("flag write failed, will retry: %s", exc)
                    await backoff.wait()
                    continue
                backoff.reset()
                self._queue.popleft()
