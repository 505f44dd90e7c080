"""Container health check: exit 0 when the admin listener answers ``GET /healthz`` with 200.

The admin address comes from the config the proxy runs with (env ``ACCESS_PROXY_CONFIG``,
``admin.listen``; default 127.0.0.1:9090), so the check follows a mounted config. A wildcard
host is checked on loopback: the check runs inside the container, beside the proxy.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from typing import Any

import yaml

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9090
WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def admin_address(config_path: str) -> tuple[str, int]:
    try:
        with open(config_path, encoding="utf-8") as f:
            doc: Any = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        doc = None
    listen: Any = ((doc or {}).get("admin") or {}).get("listen") or {}
    host = str(listen.get("host", DEFAULT_HOST))
    port = int(listen.get("port", DEFAULT_PORT))
    if host in WILDCARDS:
        host = DEFAULT_HOST
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return host, port


def main() -> int:
    host, port = admin_address(os.environ.get("ACCESS_PROXY_CONFIG", "config/proxy.yaml"))
    url = f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            ok = resp.status == 200
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
