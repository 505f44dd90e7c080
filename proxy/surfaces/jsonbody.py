"""JSON request bodies: parsed once, nesting bounded, duplicate keys refused where they matter.

The fast path is one parse (``proxy.fastjson``: what ``json.loads`` reads, faster). It keeps the
last of duplicate keys and another parser may keep the first, so a body in which a model key
could be duplicated (the raw text holds more ``"model"`` keys than the parsed object shows, or an
escaped ASCII letter such as ``\\u006d`` that could spell one) is parsed again strictly, and any
duplicate key is refused.
"""

from __future__ import annotations

import json
import re
from typing import Any

from proxy import fastjson
from proxy.surfaces.errors import invalid

MAX_DEPTH = 64
_COUNT_BELOW = 4096
_MODEL_KEY = b'"model"'
_ESCAPED_LETTER = re.compile(rb"\\u00[4-7]")


class _DuplicateKey(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def loads(body: bytes, *, strict: bool = False) -> Any:
    """The JSON value of ``body``; strict: duplicate keys refused. Always depth-bounded."""
    try:
        doc = json.loads(body, object_pairs_hook=_unique_pairs) if strict else fastjson.loads(body)
    except _DuplicateKey as exc:
        raise invalid(f"The JSON body has the key {exc.args[0]!r} more than once.") from None
    except RecursionError:
        raise invalid(f"The JSON body is nested deeper than {MAX_DEPTH} levels.") from None
    except (ValueError, UnicodeDecodeError):
        raise invalid("The request body is not valid JSON.") from None
    # Deeper than 64 needs 65 openers; a large body is walked without counting them first.
    if (len(body) > _COUNT_BELOW or body.count(b"{") + body.count(b"[") > MAX_DEPTH) and _too_deep(
        doc
    ):
        raise invalid(f"The JSON body is nested deeper than {MAX_DEPTH} levels.")
    return doc


def _too_deep(doc: Any) -> bool:
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if type(node) is dict else node
        for child in children:
            if type(child) is dict or type(child) is list:
                if depth >= MAX_DEPTH:
                    return True
                stack.append((child, depth + 1))
    return False


def model_value(value: Any, where: str) -> str | None:
    """A ``model`` member as a name: a string; null and "" name nothing; anything else → 400."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid(f"{where} must be a string.")
    return value if value.strip() else None


def object_models(body: bytes) -> tuple[Any, list[str]]:
    """The parsed body and the model names it holds: ``model`` and ``session.model``."""
    doc = loads(body)
    if type(doc) is not dict:
        return doc, []
    model = doc.get("model")
    if (  # the common case: one plain model key, no session, nothing that could hide another
        type(model) is str
        and "session" not in doc
        and body.count(_MODEL_KEY) == 1
        and b"\\u00" not in body
        and model.strip()
    ):
        return doc, [model]
    names, keys = _models_in(doc)
    if body.count(_MODEL_KEY) != keys or (b"\\u00" in body and _ESCAPED_LETTER.search(body)):
        doc = loads(body, strict=True)  # refuses the duplicates; else the same document
        names, keys = _models_in(doc)
    return doc, names


def _models_in(doc: dict[str, Any]) -> tuple[list[str], int]:
    names: list[str] = []
    keys = 0
    if "model" in doc:
        keys += 1
        name = model_value(doc["model"], "model")
        if name is not None:
            names.append(name)
    session = doc.get("session")
    if type(session) is dict and "model" in session:
        keys += 1
        name = model_value(session["model"], "session.model")
        if name is not None:
            names.append(name)
    return names, keys
