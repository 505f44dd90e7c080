"""The checks after the pure decision that need the network (SPEC §3.4 rows 11 and 12):
the category classifier, then the rate limit and concurrency cap. Plugged into the handler as
``Hooks.admit``."""

from __future__ import annotations

from functools import partial

import aiohttp

from proxy import metrics
from proxy.dataplane.app import ADMITTED, Admission, deny_response
from proxy.dataplane.classifier import classify
from proxy.policy import Decision
from proxy.policy.facts import Facts
from proxy.snapshot import Snapshot
from proxy.store.ratelimit import RateLimiter


def _refuse(code: str, rid: str, headers: dict[str, str] | None = None) -> Admission:
    return Admission(refused_code=code, refused=deny_response(code, rid, headers=headers))


class Admitter:
    def __init__(self, session: aiohttp.ClientSession, limiter: RateLimiter | None) -> None:
        self.session = session
        self.limiter = limiter
        self._classifier_open = metrics.FAILURE_MODE.labels("classifier", "open")
        self._classifier_closed = metrics.FAILURE_MODE.labels("classifier", "closed")

    async def admit(
        self, snap: Snapshot, facts: Facts, decision: Decision, body: bytes, rid: str
    ) -> Admission:
        cfg = snap.config
        # Row 11: only asked where the tier or program blocks some category.
        if decision.blocked_categories and cfg.misuse.classifier.url is not None:
            categories = await classify(self.session, cfg.misuse.classifier, body)
            if categories is None:
                if cfg.misuse.classifier.fail_mode == "closed":
                    self._classifier_closed.inc()
                    return _refuse("category_blocked", rid)
                self._classifier_open.inc()
            elif categories & decision.blocked_categories:
                return _refuse("category_blocked", rid)

        # Row 12.
        limit = decision.rate_limit
        if self.limiter is None or limit is None or not cfg.rate_limits.enabled:
            return ADMITTED
        program = decision.program.name if decision.program is not None else None
        ws = facts.workspace.workspace_id
        limiter = self.limiter
        # From this replica's lease when it can: no coroutine, no task (the common case).
        result = limiter.acquire_now(ws, program, limit) or await limiter.acquire(
            ws, program, limit
        )
        headers = result.headers()
        if not result.allowed:
            return _refuse("rate_limit_exceeded", rid, headers)
        tpm = limit.tokens_per_minute
        return Admission(
            headers=headers,
            # A slot back to the pool is freed at once; only a Redis call is left to a task.
            release=partial(limiter.free, result) if result.slot is not None else None,
            on_tokens=partial(limiter.consume, ws, program, tokens_per_minute=tpm) if tpm else None,
        )
