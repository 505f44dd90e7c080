"""Batch input files (JSONL, uploaded with purpose ``batch``): the models their lines name.

Fed as the upload streams through the multipart parser: only the current line is held. Each
line is parsed strictly (duplicate keys refused) and names ``body.model``; a line for an
endpoint that needs a model and names none, or that is not a JSON object, is refused, because
the batch would otherwise run lines the proxy could not decide.
"""

from __future__ import annotations

from typing import Any

from proxy.modelnames import normalize
from proxy.surfaces.endpoints import endpoint_of
from proxy.surfaces.errors import BodyError, invalid
from proxy.surfaces.jsonbody import loads, model_value


class BatchFileScanner:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.models: dict[str, str] = {}  # normalized → first spelling
        self.error: BodyError | None = None
        self._line = bytearray()
        self._number = 0

    def feed(self, chunk: bytes) -> None:
        if self.error is not None:
            return
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            self._line += chunk[start:end]
            self._take()
            start = end + 1
        self._line += chunk[start:]
        if len(self._line) > self.limit:
            self.error = invalid("A batch file line is longer than the body limit.")

    def finish(self) -> None:
        if self._line and self.error is None:
            self._take()

    def _take(self) -> None:
        self._number += 1
        raw = bytes(self._line).strip(b" \t\r")
        self._line.clear()
        if not raw:
            return
        try:
            self._line_models(raw)
        except BodyError as exc:
            self.error = invalid(f"Batch file line {self._number}: {exc.message}")

    def _line_models(self, raw: bytes) -> None:
        line: Any = loads(raw, strict=True)
        if type(line) is not dict:
            raise invalid("not a JSON object.")
        body = line.get("body")
        if body is not None and type(body) is not dict:
            raise invalid("body must be a JSON object.")
        name = model_value(body.get("model"), "body.model") if body else None
        url = line.get("url")
        if name is None:
            needs = isinstance(url, str) and endpoint_of("POST", url)[0].requires_model
            if needs or url is None:
                raise invalid("names no model (body.model).")
            return
        self.models.setdefault(normalize(name), name)
