"""The one background-loop helper: backoff, periodic steps that survive a failure, tasks that
stop cleanly."""

from __future__ import annotations

import asyncio
import logging

import pytest

from proxy.background import Backoff, Task, every
from tests.conftest import wait_until


async def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    backoff = Backoff(0.001, 0.004)
    delays = []
    for _ in range(4):
        delays.append(backoff.delay)
        await backoff.wait()
    assert delays == [0.001, 0.002, 0.004, 0.004]
    backoff.reset()
    assert backoff.delay == 0.001


async def test_every_runs_on_after_a_failing_step(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    async def step() -> None:
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("boom")

    task = Task("test-every", lambda: every(0.001, step, "test step"))
    with caplog.at_level(logging.ERROR, logger="proxy.background"):
        task.start()
        assert task.running
        await wait_until(lambda: len(calls) >= 4, timeout=10)
        await task.stop()
    assert not task.running
    assert any("test step failed" in r.getMessage() for r in caplog.records)
    stopped_at = len(calls)
    await asyncio.sleep(0.01)
    assert len(calls) == stopped_at


async def test_every_reads_a_changing_period_and_may_start_with_the_step() -> None:
    seen: list[float] = []
    period = [0.001]

    def step() -> None:
        seen.append(period[0])
        period[0] = 0.002

    task = Task("test-period", lambda: every(lambda: period[0], step, "p", first_wait=False))
    task.start()
    await wait_until(lambda: len(seen) >= 3, timeout=10)
    await task.stop()
    assert seen[0] == 0.001 and seen[1:3] == [0.002, 0.002]


async def test_a_task_that_ends_by_itself_can_be_waited_for() -> None:
    done = asyncio.Event()

    async def run() -> None:
        done.set()

    task = Task("test-once", run)
    assert await task.wait(0.1)  # not started: nothing to wait for
    task.start()
    assert await task.wait(10) and done.is_set()
    await task.stop()
