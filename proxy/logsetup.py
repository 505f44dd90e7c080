"""Logging of ``serve`` and ``demo``: one line per record on stderr, at the level of env
``ACCESS_PROXY_LOG_LEVEL`` (default INFO). Requests are not logged here (see ``accesslog``)."""

from __future__ import annotations

import logging

from proxy import env


def configure_logging() -> None:
    logging.basicConfig(
        level=env.log_level(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
