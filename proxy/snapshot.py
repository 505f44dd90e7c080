"""The current config snapshot and what is derived from it once per config, not per request.

``Holder.current`` is read once at the start of a request and that object is used to the end;
a reload replaces the attribute in one assignment, so requests in flight keep their snapshot and
no lock sits on the hot path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from proxy import env
from proxy.config import Config


@dataclass(frozen=True)
class Snapshot:
    config: Config
    upstream_keys: Mapping[str, str | None]
    strip_response_headers: frozenset[str]
    host_routes: bool  # whether any route matches on the Host header

    @classmethod
    def of(cls, cfg: Config) -> Snapshot:
        return cls(
            config=cfg,
            upstream_keys=MappingProxyType(
                {n: env.secret(u.api_key_env) for n, u in cfg.upstreams.items()}
            ),
            strip_response_headers=frozenset({cfg.misuse.upstream_flag_header}),
            host_routes=any(r.host is not None for r in cfg.routes),
        )


class Holder:
    def __init__(self, cfg: Config) -> None:
        self.current = Snapshot.of(cfg)

    def swap(self, cfg: Config) -> Snapshot:
        snap = Snapshot.of(cfg)
        self.current = snap
        return snap
