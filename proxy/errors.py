"""The one table of error codes (SPEC §3.4, §7) and the OpenAI-shaped error body.

Every deny in the data plane and every error of the admin API is built from this table, so a
code always travels with the same status and ``type``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ErrorCode:
    code: str
    status: int
    message: str

    @property
    def type(self) -> str:
        return error_type(self.status)


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


_TABLE = (
    ErrorCode("unknown_route", 404, "No route matches this path."),
    ErrorCode("invalid_api_key", 401, "Incorrect or missing API key."),
    ErrorCode("workspace_suspended", 403, "This workspace is suspended."),
    ErrorCode("request_too_large", 413, "The request body is too large."),
    ErrorCode("request_timeout", 408, "The request did not arrive in time."),
    ErrorCode("invalid_request", 400, "The request is not valid."),
    ErrorCode("product_unavailable", 403, "This model is not available on this product."),
    ErrorCode(
        "model_not_found",
        404,
        "The model does not exist or you do not have access to it.",
    ),
    ErrorCode("access_pending_review", 403, "Access to this model is pending review."),
    ErrorCode("access_not_yet_enabled", 403, "Access to this model is not yet enabled."),
    ErrorCode("access_suspended", 403, "Access to this model is suspended."),
    ErrorCode("access_expired", 403, "Access to this model has expired."),
    ErrorCode("misuse_cooldown", 429, "Requests are paused for this workspace; retry later."),
    ErrorCode("category_blocked", 403, "This kind of request is not allowed for this workspace."),
    ErrorCode("rate_limit_exceeded", 429, "Rate limit exceeded; retry later."),
    ErrorCode(
        "entitlement_unavailable",
        503,
        "Access could not be verified right now; retry later.",
    ),
    ErrorCode("upstream_unavailable", 502, "The model service is unreachable."),
    ErrorCode("upstream_timeout", 504, "The model service timed out."),
    # Admin API (SPEC §7).
    ErrorCode("unauthorized", 401, "Missing or invalid admin token."),
    ErrorCode("forbidden", 403, "This token lacks the role for this action."),
    ErrorCode("not_found", 404, "No such resource."),
    ErrorCode("conflict", 409, "The resource already exists."),
    ErrorCode("invalid_body", 422, "The request body is not valid."),
    ErrorCode("not_eligible", 422, "The organization is not eligible for this program."),
    ErrorCode("invalid_config", 422, "The configuration is not valid."),
    ErrorCode("store_unavailable", 503, "The store is unreachable; nothing was changed."),
    ErrorCode("internal_error", 500, "Internal error."),
)

CODES: dict[str, ErrorCode] = {e.code: e for e in _TABLE}


def error_payload(
    code: str, message: str | None = None, param: str | None = None
) -> dict[str, Any]:
    entry = CODES[code]
    return {
        "error": {
            "message": message or entry.message,
            "type": entry.type,
            "code": code,
            "param": param,
        }
    }


def error_json(code: str, message: str | None = None, param: str | None = None) -> bytes:
    return json.dumps(error_payload(code, message, param)).encode()


# Pre-encoded bodies for the default messages: the data plane's denies cost no encoding.
DEFAULT_BODIES: dict[str, bytes] = {code: error_json(code) for code in CODES}
