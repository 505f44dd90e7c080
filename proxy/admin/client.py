"""A small blocking HTTP client for the admin API, used by the ``access-proxy admin`` CLI.

Errors come back as ``AdminError`` carrying the API's status, code and message (or, when the
API cannot be reached, status 0 and the reason).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

from proxy import env

PREFIX = "/admin/v1"
DEFAULT_URL = "http://127.0.0.1:9090"
URL_ENV = env.ADMIN_URL
TOKEN_ENV = env.ADMIN_TOKEN


class AdminError(Exception):
    def __init__(
        self, status: int, code: str, message: str, body: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.body: Mapping[str, Any] = body or {}
        param = self.body.get("error", {}).get("param") if body else None
        self.param: str | None = param if isinstance(param, str) else None


def seg(value: str) -> str:
    """One path segment, quoted so an id cannot change the path."""
    return quote(value, safe="")


class AdminClient:
    def __init__(self, url: str, token: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, str | int | None] | None = None,
    ) -> Any:
        """Send one request to ``PREFIX + path``; the decoded JSON answer (None for 204)."""
        url = self.url + PREFIX + path
        if query:
            params = {k: str(v) for k, v in query.items() if v is not None}
            if params:
                url += "?" + urlencode(params)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"authorization": f"Bearer {self.token}", "accept": "application/json"}
        if data is not None:
            headers["content-type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise _api_error(exc.code, exc.read()) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(
                0, "unreachable", f"cannot reach the admin API at {self.url}: {reason}"
            ) from None
        return json.loads(raw) if raw else None


def _api_error(status: int, raw: bytes) -> AdminError:
    try:
        body = json.loads(raw)
        err = body["error"]
        return AdminError(status, str(err["code"]), str(err["message"]), body)
    except (ValueError, KeyError, TypeError):
        text = raw.decode("utf-8", "replace").strip() or f"HTTP {status}"
        return AdminError(status, f"http_{status}", text)
