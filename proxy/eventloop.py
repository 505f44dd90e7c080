"""The event loop every access-proxy process runs on: uvloop when it is installed (the
``uvloop`` extra, which ``make install`` pulls), else asyncio's own loop.

``ACCESS_PROXY_LOOP=asyncio`` forces asyncio's loop (``uvloop`` insists on uvloop and fails if
it is missing); the test suite runs the end-to-end tests under both.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

from proxy import env

T = TypeVar("T")


FIX = "pip install 'access-proxy[uvloop]', or unset ACCESS_PROXY_LOOP"


class LoopUnavailable(RuntimeError):
    """``ACCESS_PROXY_LOOP=uvloop`` where uvloop is not installed."""


def chosen() -> str:
    """The loop a process started now runs on: ``uvloop`` or ``asyncio``."""
    wanted = env.event_loop()
    installed = importlib.util.find_spec("uvloop") is not None
    if wanted == "uvloop" and not installed:
        raise LoopUnavailable(f"{env.LOOP}=uvloop but uvloop is not installed")
    if wanted in ("uvloop", "auto") and installed:
        return "uvloop"
    return "asyncio"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the chosen loop."""
    if chosen() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def running() -> str:
    """The name of the loop this code runs on (``uvloop`` or ``asyncio``), for /readyz."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
