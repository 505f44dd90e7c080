"""One Redis pub/sub subscription kept alive: reconnect with backoff, and a hook that runs on
every (re)subscribe, since anything published while unsubscribed is lost to this listener."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import redis.asyncio as aioredis

from proxy.background import Backoff

log = logging.getLogger(__name__)


async def subscribe_forever(
    redis: aioredis.Redis,
    channel: str,
    *,
    on_subscribed: Callable[[], object],
    on_message: Callable[[bytes | str], None],
    connected: asyncio.Event,
    what: str,
) -> None:
    backoff = Backoff(0.05, 1.0)
    while True:
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            on_subscribed()
            connected.set()
            backoff.reset()
            task = asyncio.current_task()
            while True:
                msg = await pubsub.get_message(timeout=1.0)
                # redis-py's read timeout can swallow a cancel that lands as it expires (a stop
                # right after the start hung here): a pending cancel ends the loop regardless.
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError
                if msg is not None and msg.get("type") == "message":
                    on_message(msg["data"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any Redis/socket failure: resubscribe
            if connected.is_set():
                log.warning("%s subscription lost: %s", what, exc)
            connected.clear()
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
        await backoff.wait()
