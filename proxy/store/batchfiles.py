"""The models of batch input files, recorded when the file is uploaded through the proxy.

``POST /v1/files`` with purpose ``batch`` names the models of its lines; the upstream's answer
gives the file id. The record lives in Redis so any replica can decide a later
``POST /v1/batches`` over that file; a file never recorded is unknown (the batch is refused).
"""

from __future__ import annotations

import json
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.store import schema


class BatchFilesUnavailable(Exception):
    """Redis could not be read or written."""


class BatchFiles:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def record(self, file_id: str, models: tuple[str, ...], workspace: str) -> None:
        items = ["models", json.dumps(list(models)), "workspace", workspace, "at", str(time.time())]
        try:
            await self.redis.hset(schema.batch_file_key(file_id), items=items)
        except (RedisError, OSError) as exc:
            raise BatchFilesUnavailable(str(exc)) from exc

    async def models_of(self, file_id: str) -> tuple[str, ...] | None:
        """The recorded models, or None for a file the proxy never saw."""
        try:
            raw = await self.redis.hget(schema.batch_file_key(file_id), "models")
        except (RedisError, OSError) as exc:
            raise BatchFilesUnavailable(str(exc)) from exc
        if raw is None:
            return None
        models = json.loads(raw)
        return tuple(str(m) for m in models)
