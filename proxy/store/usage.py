"""Usage and cost totals per workspace in Redis (SPEC §10), in all and per UTC day.

One hash per workspace, ``schema.usage_key(ws)``, holds running totals: ``requests`` (answers whose
usage was read), the tokens of each kind (``input`` is uncached input; ``cached_input``,
``cache_write``, ``output``) and ``cost_usd``; the same fields per model under
``model:{model}:{field}``. One hash per workspace and UTC day, ``schema.usage_day_key(ws, date)``,
holds the same fields for that day and expires ``retention_days`` after the day ends. Writes
only ever add (``HINCRBY`` / ``HINCRBYFLOAT``), so batches from any number of replicas add up in
any order, and the days of a workspace add up to its total. Usage is not an access change:
nothing is audited.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from proxy.store.schema import usage_day_key, usage_key
from proxy.store.topology import AnyRedis

TOKEN_KINDS = ("input", "cached_input", "cache_write", "output")
_MODEL_PREFIX = "model:"
_DAY_S = 86_400
_EPOCH = datetime.date(1970, 1, 1)

__all__ = ["TOKEN_KINDS", "Batch", "UsageDelta", "UsageStore", "day_of", "usage_key"]


@functools.lru_cache(maxsize=8)
def _day_name(day_number: int) -> str:
    return (_EPOCH + datetime.timedelta(days=day_number)).isoformat()


def day_of(ts: float) -> str:
    """The UTC day of a Unix time, ``YYYY-MM-DD``."""
    return _day_name(int(ts // _DAY_S))


def _day_start(day: str) -> int:
    return (datetime.date.fromisoformat(day) - _EPOCH).days * _DAY_S


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


# (workspace, model or None, UTC day) -> what to add. A None model adds to the workspace totals
# only.
Batch = Mapping[tuple[str, str | None, str], UsageDelta]
MutableBatch = MutableMapping[tuple[str, str | None, str], UsageDelta]


def _view(values: Mapping[str, str]) -> dict[str, Any]:
    return {
        "requests": int(values.get("requests", 0)),
        "tokens": {kind: int(values.get(kind, 0)) for kind in TOKEN_KINDS},
        "cost_usd": float(values.get("cost_usd", 0.0)),
    }


def _add(pipe: Any, key: str, prefix: str, delta: UsageDelta) -> None:
    for name, value in delta.fields():
        if value:
            pipe.hincrby(key, prefix + name, value)
    if delta.cost_usd:
        pipe.hincrbyfloat(key, prefix + "cost_usd", delta.cost_usd)


def _read_hash(raw: Mapping[Any, Any]) -> dict[str, Any]:
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


def days_between(first: str, last: str) -> list[str]:
    """Every UTC day from ``first`` to ``last`` (``YYYY-MM-DD``), both included."""
    start, end = datetime.date.fromisoformat(first), datetime.date.fromisoformat(last)
    return [(start + datetime.timedelta(days=n)).isoformat() for n in range((end - start).days + 1)]


def sum_views(views: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-day answers of :meth:`UsageStore.read_days` added up (with their models)."""
    total: dict[str, Any] = _view({})
    total["models"] = {}

    def add(into: dict[str, Any], view: dict[str, Any]) -> None:
        into["requests"] += view["requests"]
        into["cost_usd"] += view["cost_usd"]
        for kind in TOKEN_KINDS:
            into["tokens"][kind] += view["tokens"][kind]

    for view in views:
        add(total, view)
        for model, per in view["models"].items():
            add(total["models"].setdefault(model, _view({})), per)
    total["models"] = dict(sorted(total["models"].items()))
    return total


class UsageStore:
    """Adds usage batches to the per-workspace hashes and reads them back."""

    def __init__(self, redis: AnyRedis) -> None:
        self.redis = redis

    async def add(self, batch: MutableBatch, retention_days: int = 400) -> None:
        """Add every delta of ``batch`` to the totals and to its day, one MULTI/EXEC per
        workspace: a workspace's share lands whole or not at all, and each transaction stays in
        its workspace's Cluster slot. What landed is removed from ``batch``, so after an error it
        holds exactly what is still to write. A day's hash expires ``retention_days`` after the
        day."""
        by_ws: dict[str, list[tuple[str | None, str, UsageDelta]]] = {}
        for (ws, model, day), delta in batch.items():
            by_ws.setdefault(ws, []).append((model, day, delta))
        for ws, deltas in by_ws.items():
            try:
                await self._add_workspace(ws, deltas, retention_days)
            except ResponseError:
                # EXEC ran: the commands Redis did not refuse are applied; never write them twice.
                for model, day, _ in deltas:
                    del batch[(ws, model, day)]
                raise
            for model, day, _ in deltas:
                del batch[(ws, model, day)]

    async def _add_workspace(
        self, ws: str, deltas: list[tuple[str | None, str, UsageDelta]], retention_days: int
    ) -> None:
        totals: dict[str, UsageDelta] = {}
        async with self.redis.pipeline(transaction=True) as pipe:
            for model, day, delta in deltas:
                totals.setdefault(day, UsageDelta()).merge(delta)
                if model is None:
                    continue
                prefix = f"{_MODEL_PREFIX}{model}:"
                _add(pipe, usage_key(ws), prefix, delta)
                _add(pipe, usage_day_key(ws, day), prefix, delta)
            for day, total in totals.items():
                _add(pipe, usage_key(ws), "", total)
                day_key = usage_day_key(ws, day)
                _add(pipe, day_key, "", total)
                pipe.expireat(day_key, _day_start(day) + (retention_days + 1) * _DAY_S)
            await pipe.execute()

    async def read(self, ws: str) -> dict[str, Any]:
        """``{requests, tokens: {kind: n}, cost_usd, models: {model: {requests, tokens,
        cost_usd}}}``; all zero for a workspace with no usage yet."""
        return _read_hash(await self.redis.hgetall(usage_key(ws)))

    async def read_days(self, ws: str, days: list[str]) -> list[dict[str, Any]]:
        """The usage of each of ``days`` (as :meth:`read`, plus ``date``), in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.hgetall(usage_day_key(ws, day))
            raws = await pipe.execute()
        return [{"date": day, **_read_hash(raw)} for day, raw in zip(days, raws, strict=True)]
