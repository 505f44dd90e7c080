"""The category classifier hook (SPEC §6): asked only when the tier or program blocks some
category. ``POST`` the client's body as JSON, answered ``200 {"categories": [...]}``."""

from __future__ import annotations

import json

import aiohttp

from proxy.config import ClassifierConfig


async def classify(
    session: aiohttp.ClientSession, cfg: ClassifierConfig, body: bytes
) -> frozenset[str] | None:
    """The request's categories, or None when the classifier failed or was too slow."""
    if cfg.url is None:
        return None
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_ms / 1000)
    try:
        async with session.post(
            cfg.url,
            data=body or b"{}",
            headers={"content-type": "application/json"},
            timeout=timeout,
        ) as resp:
            if resp.status != 200:
                return None
            doc = json.loads(await resp.read())
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    cats = doc.get("categories") if isinstance(doc, dict) else None
    if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
        return None
    return frozenset(c.strip().lower() for c in cats)
