"""Usage and cost totals per workspace in Redis (SPEC §10).

One hash per workspace, ``ap:usage:{ws}``, holds running totals: ``requests`` (answers whose
usage was read), the tokens of each kind (``input`` is uncached input; ``cached_input``,
``cache_write``, ``output``) and ``cost_usd``; the same fields per model under
``model:{model}:{field}``. Writes only ever add (``HINCRBY`` / ``HINCRBYFLOAT``), so batches from
any number of replicas add up in any order. Usage is not an access change: nothing is audited.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

TOKEN_KINDS = ("input", "cached_input", "cache_write", "output")
_MODEL_PREFIX = "model:"


def usage_key(ws: str) -> str:
    return f"ap:usage:{ws}"


@dataclass(slots=True)
class UsageDelta:
    """What a batch adds to one workspace (and model): requests, tokens by kind, cost."""

    requests: int = 0
    input: int = 0
    cached_input: int = 0
    cache_write: int = 0
    output: int = 0
    cost_usd: float = 0.0

    def merge(self, other: UsageDelta) -> None:
        self.requests += other.requests
        self.input += other.input
        self.cached_input += other.cached_input
        self.cache_write += other.cache_write
        self.output += other.output
        self.cost_usd += other.cost_usd

    def fields(self) -> tuple[tuple[str, int], ...]:
        """The integer fields with their values, ``requests`` first."""
        return (
            ("requests", self.requests),
            ("input", self.input),
            ("cached_input", self.cached_input),
            ("cache_write", self.cache_write),
            ("output", self.output),
        )


# (workspace, model or None) -> what to add. A None model adds to the workspace totals only.
Batch = Mapping[tuple[str, str | None], UsageDelta]


def _view(values: Mapping[str, str]) -> dict[str, Any]:
    return {
        "requests": int(values.get("requests", 0)),
        "tokens": {kind: int(values.get(kind, 0)) for kind in TOKEN_KINDS},
        "cost_usd": float(values.get("cost_usd", 0.0)),
    }


class UsageStore:
    """Adds usage batches to the per-workspace hashes and reads them back."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def add(self, batch: Batch) -> None:
        """Add every delta of ``batch`` in one MULTI/EXEC: the whole batch lands or none of it."""
        if not batch:
            return
        totals: dict[str, UsageDelta] = {}
        async with self.redis.pipeline(transaction=True) as pipe:
            for (ws, model), delta in batch.items():
                totals.setdefault(ws, UsageDelta()).merge(delta)
                if model is None:
                    continue
                key = usage_key(ws)
                prefix = f"{_MODEL_PREFIX}{model}:"
                for name, value in delta.fields():
                    if value:
                        pipe.hincrby(key, prefix + name, value)
                if delta.cost_usd:
                    pipe.hincrbyfloat(key, prefix + "cost_usd", delta.cost_usd)
            for ws, total in totals.items():
                key = usage_key(ws)
                for name, value in total.fields():
                    if value:
                        pipe.hincrby(key, name, value)
                if total.cost_usd:
                    pipe.hincrbyfloat(key, "cost_usd", total.cost_usd)
            await pipe.execute()

    async def read(self, ws: str) -> dict[str, Any]:
        """``{requests, tokens: {kind: n}, cost_usd, models: {model: {requests, tokens,
        cost_usd}}}``; all zero for a workspace with no usage yet."""
        raw: dict[Any, Any] = await self.redis.hgetall(usage_key(ws))
        top: dict[str, str] = {}
        per_model: dict[str, dict[str, str]] = {}
        for k, v in raw.items():
            name = k.decode() if isinstance(k, bytes) else str(k)
            value = v.decode() if isinstance(v, bytes) else str(v)
            if name.startswith(_MODEL_PREFIX):
                model, _, field = name[len(_MODEL_PREFIX) :].rpartition(":")
                per_model.setdefault(model, {})[field] = value
            else:
                top[name] = value
        answer = _view(top)
        answer["models"] = {model: _view(values) for model, values in sorted(per_model.items())}
        return answer
