"""Where a request names its models (SPEC §3.3): method, path, query, headers and body in, the
names (or a refusal) out. Pure: no I/O, no config.

Read, every time: the path (``/v1/models/{model}``), the query's ``model``, and a body whatever
its ``Content-Type``: ``multipart/*`` by its ``model`` fields, form-urlencoded by its ``model``
fields (and as JSON if it is a JSON object), anything else as JSON (``model`` and
``session.model`` of an object). A compressed body is decoded first. Two different names →
400; a body that cannot be read → 400; nothing found on an endpoint that needs a model → 400.
``POST /v1/files`` with purpose ``batch`` also names every line's model; ``POST /v1/batches``
names its ``input_file_id``, which the data plane resolves from the upload's record.

A plain JSON chat body costs one JSON parse and a few byte scans; the parsed object is
handed back (``Named.doc``) so later steps do not parse it again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proxy.modelnames import normalize
from proxy.surfaces import encoding
from proxy.surfaces.batchfile import BatchFileScanner
from proxy.surfaces.endpoints import Endpoint, endpoint_of
from proxy.surfaces.errors import invalid
from proxy.surfaces.forms import MultipartFields, fields_named, multipart_fields, pairs_of
from proxy.surfaces.jsonbody import object_models

_MODEL_FIELDS = frozenset({"model"})
_UPLOAD_FIELDS = frozenset({"model", "purpose"})
_JSON_START = b"{"
_JSON = "application/json"


@dataclass(slots=True)
class Named:
    models: tuple[str, ...]  # distinct (after normalization), as first spelled
    endpoint: Endpoint
    doc: Any = None  # the parsed JSON body, when it was JSON
    batch_file: bool = False  # an upload with purpose batch: record its models
    input_file_id: str | None = None  # POST /v1/batches: decide the file's recorded models
    encoded: bool = False  # the body came compressed (``doc`` is of the decoded bytes)
    decoded: bytes = b""  # when ``encoded``: the body decoded (for the classifier)


class _Names:
    """Names from the request's places; two that differ after normalization → 400."""

    __slots__ = ("first", "norm")

    def __init__(self) -> None:
        self.first: str | None = None
        self.norm: str | None = None

    def add(self, name: str) -> None:
        if self.first is None:  # normalized only when a second name comes to compare
            if name.strip():
                self.first = name
            return
        if self.norm is None:
            self.norm = normalize(self.first)
        norm = normalize(name)
        if norm and norm != self.norm:
            raise invalid("The request names two different models.")


def query_models(raw_query: str) -> list[str]:
    """The ``model`` fields of a raw query string."""
    return fields_named(pairs_of(raw_query, plus_is_space=True), "model")


def named_models(
    method: str,
    path: str,
    raw_query: str,
    content_types: Sequence[str],
    content_encodings: Sequence[str],
    body: bytes,
    limit: int,
) -> Named:
    """The models a request names; raises ``BodyError`` for a request that cannot be decided."""
    endpoint, path_model = endpoint_of(method, path)
    names = _Names()
    if path_model is not None:
        names.add(path_model)
    if raw_query:
        for name in query_models(raw_query):
            names.add(name)
    named = Named((), endpoint)
    if body:
        if content_encodings:
            codings = encoding.codings_of(content_encodings)
            if codings:
                body = encoding.decode(body, codings, limit)
                named.encoded, named.decoded = True, body
        _read_body(named, names, body, content_types, limit)
    if names.first is not None:
        if named.models:  # a batch upload's lines: the request's own name first, once
            norm = normalize(names.first)
            named.models = (names.first, *(m for m in named.models if normalize(m) != norm))
        else:
            named.models = (names.first,)
    if not named.models and endpoint.requires_model and method == "POST":
        raise invalid("The request must name a model.")
    if endpoint.kind == "batch_create" and method == "POST":
        named.input_file_id = _input_file_id(named.doc)
    return named


def _read_body(
    named: Named, names: _Names, body: bytes, content_types: Sequence[str], limit: int
) -> None:
    if len(content_types) > 1 and len(set(content_types)) > 1:
        raise invalid("The request has conflicting Content-Type headers.")
    ctype = content_types[0] if content_types else ""
    if ctype == _JSON:
        _read_json(named, names, body)
        return
    mime = ctype.split(";", 1)[0].strip().lower()
    if mime.startswith("multipart/"):
        _read_multipart(named, names, body, ctype, limit)
        return
    if mime == "application/x-www-form-urlencoded":
        if body.lstrip()[:1] == _JSON_START:
            _read_json(named, names, body)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise invalid("The form body is not valid UTF-8.") from None
        for name in fields_named(pairs_of(text, plus_is_space=True), "model"):
            names.add(name)
        return
    _read_json(named, names, body)


def _read_json(named: Named, names: _Names, body: bytes) -> None:
    doc, found = object_models(body)
    named.doc = doc
    for name in found:
        names.add(name)


def _read_multipart(named: Named, names: _Names, body: bytes, ctype: str, limit: int) -> None:
    scanner: BatchFileScanner | None = None
    if named.endpoint.kind == "batch_upload":
        scanner = BatchFileScanner(limit)
        form = MultipartFields()

        def scan(chunk: bytes) -> None:
            # A purpose sent before the file and other than batch: nothing to scan.
            purposes = form.fields.get("purpose")
            if not purposes or any(_is_batch(p) for p in purposes):
                scanner.feed(chunk)

        multipart_fields(body, ctype, _UPLOAD_FIELDS, ("file", scan), form)
    else:
        form = multipart_fields(body, ctype, _MODEL_FIELDS)
    for name in form.fields.get("model", ()):
        names.add(name)
    purposes = {p.strip().casefold() for p in form.fields.get("purpose", ())}
    if len(purposes) > 1:
        raise invalid("The upload names two different purposes.")
    if scanner is not None and any(_is_batch(p) for p in purposes):
        scanner.finish()
        if scanner.error is not None:
            raise scanner.error
        named.batch_file = True
        named.models = tuple(scanner.models.values())


def _is_batch(purpose: str) -> bool:
    return purpose.strip().casefold() == "batch"


def _input_file_id(doc: Any) -> str:
    file_id = doc.get("input_file_id") if type(doc) is dict else None
    if not isinstance(file_id, str) or not file_id.strip():
        raise invalid("A batch needs an input_file_id.")
    return file_id
