"""Entitlement facts in Redis: schema, reads, audited writes, the in-process cache and its
invalidation, rate-limit scripts and usage. Knows nothing of HTTP."""
