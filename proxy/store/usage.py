"""Usage and cost totals per workspace in Redis (SPEC §10).

One hash per workspace, ``schema.usage_key(ws)``, holds running totals: ``requests`` (answers whose
usage was read), the tokens of each kind (``input`` is uncached input; ``cached_input``,
``cache_write``, ``output``) and ``cost_usd``; the same fields per model under
``model:{model}:{field}``. Writes only ever add (``HINCRBY`` / ``HINCRBYFLOAT``), so batches from
any number of replicas add up in any order. Usage is not an access change: nothing is audited.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from proxy.store.schema import usage_key
from proxy.store.topology import AnyRedis

TOKEN_KINDS = ("input", "cached_input", "cache_write", "output")
_MODEL_PREFIX = "model:"


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
MutableBatch = MutableMapping[tuple[str, str | None], UsageDelta]


def _view(values: Mapping[str, str]) -> dict[str, Any]:
    return {
        "requests": int(values.get("requests", 0)),
        "tokens": {kind: int(values.get(kind, 0)) for kind in TOKEN_KINDS},
        "cost_usd": float(values.get("cost_usd", 0.0)),
    }


class UsageStore:
    """Adds usage batches to the per-workspace hashes and reads them back."""

    def __init__(self, redis: AnyRedis) -> None:
        self.redis = redis

    async def add(self, batch: MutableBatch) -> None:
        """Add ``batch``, one MULTI/EXEC per workspace: a workspace's share lands whole or not at
        all, and each transaction stays in its workspace's Cluster slot. What landed is removed
        from ``batch``, so after an error it holds exactly what is still to write."""
        by_ws: dict[str, list[tuple[str | None, UsageDelta]]] = {}
        for (ws, model), delta in batch.items():
            by_ws.setdefault(ws, []).append((model, delta))
        for ws, deltas in by_ws.items():
            try:
                await self._add_workspace(ws, deltas)
            except ResponseError:
                # EXEC ran: the commands Redis did not refuse are applied; never write them twice.
                for model, _ in deltas:
                    del batch[(ws, model)]
                raise
            for model, _ in deltas:
                del batch[(ws, model)]

    async def _add_workspace(self, ws: str, deltas: list[tuple[str | None, UsageDelta]]) -> None:
        key = usage_key(ws)
        total = UsageDelta()
        async with self.redis.pipeline(transaction=True) as pipe:
            for model, delta in deltas:
                total.merge(delta)
                if model is None:
                    continue
                prefix = f"{_MODEL_PREFIX}{model}:"
                for name, value in delta.fields():
                    if value:
                        pipe.hincrby(key, prefix + name, value)
                if delta.cost_usd:
                    pipe.hincrbyfloat(key, prefix + "cost_usd", delta.cost_usd)
            for name, value in total.fields():
                if value:
                    pipe.hincrby(key, name, value)
            if total.cost_usd:
                pipe.hincrbyfloat(key, "cost_usd", total.cost_usd)
            if len(pipe):
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
