"""Admin request bodies as JSON objects, refused with the field to blame (SPEC §7).

A body must be UTF-8 JSON whose top level is an object. Nesting deeper than ``MAX_DEPTH`` is
refused before parsing (a deep document would exhaust the parser's recursion), and a string with
an unpaired surrogate (``"\\udfff"`` is valid JSON but no text) is refused after it, each naming
the top-level field it sits in, so no admin body can reach the store in a shape it cannot write.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 64

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


def _has_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


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
        if _SURROGATE.search(name):
            raise BodyInvalid("a field name holds an unpaired surrogate (not valid text)")
        if _has_surrogate(value):
            raise BodyInvalid(f"{name} holds an unpaired surrogate (not valid text)", name)
    return data
