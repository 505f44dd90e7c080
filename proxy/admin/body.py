"""Admin request bodies as JSON objects, refused with the field to blame (SPEC §7).

A body must be UTF-8 JSON whose top level is an object. Nesting deeper than ``MAX_DEPTH`` is
refused before parsing (a deep document would exhaust the parser's recursion); a string with an
unpaired surrogate (``"\\udfff"`` is valid JSON but no text), a string longer than
``MAX_STRING`` or a list or object of more than ``MAX_ITEMS`` is refused after it. Each names the
top-level field it sits in, so no admin body reaches the store in a shape it cannot write.
Endpoints then check their own fields more narrowly.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 64
MAX_STRING = 10_000
MAX_ITEMS = 1_000

# A JSON string (with an optional ``:`` after it: an object key), or a bracket.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"(\s*:)?|[\[\]{}]', re.DOTALL)
_SURROGATE = re.compile("[\ud800-\udfff]")


class BodyInvalid(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _too_deep(text: str) -> tuple[bool, str | None]:
    """Whether ``text`` nests deeper than ``MAX_DEPTH``, and the top-level key it happens in."""
    depth = 0
    field: str | None = None
    for match in _TOKEN.finditer(text):
        token = match.group()
        first = token[0]
        if first == '"':
            if depth == 1 and match.group(1) is not None:
                field = _key_text(token[: match.start(1) - match.start()])
        elif first in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return True, field
        else:
            depth -= 1
    return False, None


def _key_text(literal: str) -> str | None:
    try:
        key = json.loads(literal)
    except ValueError:
        return None
    return key if isinstance(key, str) and not _SURROGATE.search(key) else None


def _value_problem(value: Any) -> str | None:
    """What makes ``value`` unacceptable anywhere in a body, or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return "holds an unpaired surrogate (not valid text)"
            if len(item) > MAX_STRING:
                return f"holds a string longer than {MAX_STRING} characters"
        elif isinstance(item, dict | list):
            if len(item) > MAX_ITEMS:
                return f"holds more than {MAX_ITEMS} items"
            if isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            else:
                stack.extend(item)
    return None


def parse_object(raw: bytes) -> dict[str, Any]:
    """The JSON object in ``raw`` (empty → ``{}``), or :class:`BodyInvalid` naming the field."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyInvalid(f"the body is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        return {}
    deep, field = _too_deep(text)
    if deep:
        where = f"{field} nests" if field else "the body nests"
        raise BodyInvalid(f"{where} deeper than {MAX_DEPTH} levels", field)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise BodyInvalid("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BodyInvalid("the body must be a JSON object")
    for name, value in data.items():
        problem = _value_problem(value)
        if problem is not None:
            raise BodyInvalid(f"{name} {problem}", name)
    return data
