"""Every environment variable access-proxy reads, named once, and the one module that reads them.

Secrets whose variable the config names (``keys.pepper_env``, ``upstreams.*.api_key_env``) are
read through ``secret``; the others have fixed names, listed here.
"""

from __future__ import annotations

import os

CONFIG = "ACCESS_PROXY_CONFIG"  # the config file when none is given on the command line
REDIS_URL = "REDIS_URL"  # wins over the config's redis.url
LOG_LEVEL = "ACCESS_PROXY_LOG_LEVEL"  # the logging level of `serve` (default INFO)
ADMIN_URL = "ACCESS_PROXY_ADMIN_URL"  # `access-proxy admin`: the admin API to talk to
ADMIN_TOKEN = "ACCESS_PROXY_ADMIN_TOKEN"  # `access-proxy admin`: the bearer token
WORKER = "ACCESS_PROXY_WORKER"  # set by the supervisor in each of its worker processes
WORKER_OF_EMBEDDED = "embedded"  # WORKER's value when the supervisor runs the embedded Redis
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"  # set by the supervisor: metrics shared by workers
LOOP = "ACCESS_PROXY_LOOP"  # auto (default: uvloop when installed), uvloop or asyncio


def get(name: str) -> str | None:
    """The variable's value; unset and empty are the same."""
    return os.environ.get(name) or None


def secret(name: str | None) -> str | None:
    """A secret from the variable the config names (None when no variable is named)."""
    return get(name) if name else None


def config_path() -> str | None:
    return get(CONFIG)


def redis_url() -> str | None:
    return get(REDIS_URL)


def log_level() -> str:
    return get(LOG_LEVEL) or "INFO"


def event_loop() -> str:
    """``auto``, ``uvloop`` or ``asyncio`` (anything else is taken as ``auto``)."""
    value = (get(LOOP) or "auto").strip().lower()
    return value if value in ("uvloop", "asyncio") else "auto"


def is_worker() -> bool:
    """Whether this process is one of the workers of ``serve --workers N``."""
    return get(WORKER) is not None


def is_worker_of_embedded() -> bool:
    """Whether this worker's supervisor runs the embedded Redis (and owns the state dir)."""
    return get(WORKER) == WORKER_OF_EMBEDDED


def multiproc_dir() -> str | None:
    return get(MULTIPROC_DIR)


def worker_environment(redis_url: str | None, multiproc_dir: str) -> dict[str, str]:
    """The environment of a worker process; ``redis_url`` is the supervisor's embedded Redis."""
    out = dict(os.environ)
    if redis_url is not None:
        out[REDIS_URL] = redis_url
    out[MULTIPROC_DIR] = multiproc_dir
    out[WORKER] = "1" if redis_url is None else WORKER_OF_EMBEDDED
    return out


def set_default(name: str, value: str) -> None:
    """Give a variable a value unless it has one (``demo`` supplies its own secrets)."""
    os.environ.setdefault(name, value)
