"""Upgrade of the key layout: from the untagged keys of single-node releases (``ap:ws:<id>``, layout
1) to the hash-tagged layout of ``schema.py`` (layout 2), run by ``serve`` when it starts.

Every durable key is renamed in place (a Lua script per key: renamed only while the old one exists
and the new one does not, so replicas starting together, or a second run, change nothing). Rate
limit buckets, concurrency slots and the replica heartbeat are short-lived and are dropped: they
are rebuilt within a minute. The layout version is then recorded in ``schema.SCHEMA_KEY``.
A Redis Cluster never held layout 1 (those releases spoke to one server only).
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.store import schema

log = logging.getLogger(__name__)

_RENAME = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
redis.call('RENAME', KEYS[1], KEYS[2])
return 1
"""


def new_name(old: str) -> str | None:
    """The layout 2 name of a layout 1 key; None for a key that is dropped or not ours."""
    if "{" in old:
        return None
    if old in schema.LAYOUT_1_FIXED:
        return schema.LAYOUT_1_FIXED[old]
    for prefix, name in schema.LAYOUT_1_RENAMES.items():
        if old.startswith(prefix) and len(old) > len(prefix):
            return name(old[len(prefix) :])
    return None


async def migrate(redis: aioredis.Redis) -> dict[str, int]:
    """Bring one server's keys to the current layout; counts of what was done."""
    counts = {"renamed": 0, "dropped": 0, "conflicts": 0}
    current = await redis.get(schema.SCHEMA_KEY)
    if current is not None and int(current) >= schema.SCHEMA_VERSION:
        return counts
    rename = redis.register_script(_RENAME)
    async for raw in redis.scan_iter(match=schema.PREFIX + "*", count=1000):
        old = raw.decode() if isinstance(raw, bytes) else str(raw)
        if "{" in old:
            continue
        if old.startswith(schema.LAYOUT_1_DROPPED):
            counts["dropped"] += int(await redis.delete(old))
            continue
        target = new_name(old)
        if target is None:
            continue
        done = int(await rename(keys=[old, target]))
        if done == 1:
            counts["renamed"] += 1
        elif done == -1:
            counts["conflicts"] += 1
            log.warning("key %s not migrated: %s exists already", old, target)
    await redis.set(schema.SCHEMA_KEY, schema.SCHEMA_VERSION)
    if counts["renamed"] or counts["dropped"]:
        log.info("Redis keys moved to layout %d: %s", schema.SCHEMA_VERSION, counts)
    return counts


async def migrate_when_reachable(redis: aioredis.Redis, retry_s: float = 1.0) -> None:
    """``migrate``, tried again every ``retry_s`` while Redis cannot be reached."""
    while True:
        try:
            await migrate(redis)
            return
        except (RedisError, OSError) as exc:
            log.warning("key layout check postponed, Redis unavailable: %s", exc)
        await asyncio.sleep(retry_s)
