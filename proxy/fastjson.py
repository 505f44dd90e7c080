"""JSON parsing on the hot path: ``orjson`` first, the standard library when orjson refuses.

orjson parses a chat body or an answer four to seven times faster than ``json.loads``, but it
refuses some documents the standard library reads (``NaN``, UTF-16 or a byte-order mark, lone
surrogate escapes, nesting past 1,024) and reads an integer past 64 bits as a float. Falling back
on the first kind, and sending a document with a run of 19 digits or more straight to the
standard library, keeps the result exactly what ``json.loads`` gives for every input
(``tests/unit/test_fastjson.py``), so what the proxy reads from a body never depends on which
parser ran; orjson, like ``json``, keeps the last of duplicate keys.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_LONG_NUMBER = re.compile(rb"[0-9]{19}")


def loads(data: bytes) -> Any:
    """``json.loads(data)``, faster. Raises ``ValueError`` (or ``RecursionError``) as it does."""
    if _LONG_NUMBER.search(data) is not None:
        return json.loads(data)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
