"""The one exception of the surfaces room: why a request body cannot be decided on."""

from __future__ import annotations


class BodyError(Exception):
    """A refusal of SPEC §3.4 row 4: ``code`` is ``invalid_request`` or ``request_too_large``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> BodyError:
    return BodyError("invalid_request", message)


def too_large(limit: int) -> BodyError:
    return BodyError("request_too_large", f"The request body exceeds {limit} bytes.")
