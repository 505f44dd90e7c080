"""The append-only, hash-chained audit log (SPEC §7).

Each entry carries ``prev_hash`` and ``hash = sha256(prev_hash || canonical JSON of the entry
without its hash)``. Entries are appended inside the same MULTI/EXEC as the change they record
(see ``writes.py``), so there is no change without its entry and the chain cannot fork.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from proxy.store.schema import AUDIT_LIST

GENESIS = "0" * 64


def canonical(entry: dict[str, Any]) -> bytes:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def chain_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(entry["prev_hash"].encode() + canonical(entry)).hexdigest()


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def make_entry(
    *,
    seq: int,
    prev_hash: str,
    at: float,
    actor: str,
    action: str,
    target: str,
    before: Any,
    after: Any,
    config_version: str,
    reason: str | None = None,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "seq": seq,
        "at": rfc3339(at),
        "actor": actor,
        "action": action,
        "target": target,
        "before": before,
        "after": after,
        "reason": reason,
        "config_version": config_version,
        "prev_hash": prev_hash,
    }
    entry["hash"] = chain_hash(entry)
    return entry


async def read_entries(redis: aioredis.Redis, after: int, limit: int) -> list[dict[str, Any]]:
    """Entries with ``seq > after`` (seq starts at 1), oldest first."""
    raw = await redis.lrange(AUDIT_LIST, after, after + limit - 1)
    return [json.loads(r) for r in raw]


def verify_chain(entries: list[dict[str, Any]], prev_hash: str = GENESIS) -> int | None:
    """The seq of the first broken entry, or None when the whole chain holds."""
    for entry in entries:
        if entry.get("prev_hash") != prev_hash or chain_hash(entry) != entry.get("hash"):
            return int(entry.get("seq", -1))
        prev_hash = entry["hash"]
    return None
