"""Background work, written once: a task that is started and stopped (``Task``), a step repeated
on a period (``every``), and the one retry backoff (``Backoff``) every loop that waits for Redis
uses.

Every background loop of the proxy is one of these: the flag recorder, the usage writer, the
invalidation and reload subscriptions, the rate limiter's upkeep, the config file watcher, the
WebSocket sweep and the in-flight gauge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Backoff:
    """Exponential delays between retries: ``first``, doubled each failure up to ``cap``, back to
    ``first`` after a success."""

    def __init__(self, first: float = 0.05, cap: float = 2.0) -> None:
        self.first = first
        self.cap = cap
        self.delay = first

    def reset(self) -> None:
        self.delay = self.first

    async def wait(self) -> None:
        """Sleep the current delay, then double it for the next failure."""
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.cap)


class Task:
    """One named background coroutine: started once, cancelled and awaited by ``stop``."""

    def __init__(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self._run = run
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._main(), name=self.name)

    async def _main(self) -> None:
        await self._run()

    async def wait(self, timeout: float) -> bool:
        """Let the task finish on its own for up to ``timeout`` s; whether it did."""
        if self._task is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def every(
    period: float | Callable[[], float],
    step: Callable[[], Awaitable[object] | object],
    what: str,
    *,
    first_wait: bool = True,
) -> None:
    """Run ``step`` every ``period`` seconds (a number, or read before each wait) until
    cancelled; a step that fails is logged and the next one runs on time."""
    first = first_wait
    while True:
        if first:
            await asyncio.sleep(period() if callable(period) else period)
        first = True
        try:
            outcome = step()
            if asyncio.iscoroutine(outcome) or isinstance(outcome, asyncio.Future):
                await outcome
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed", what)
