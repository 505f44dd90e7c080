"""Form fields: the query string, ``application/x-www-form-urlencoded`` and
``multipart/form-data`` bodies, read for the fields that name models.

Field names are compared trimmed and case-folded, pairs are split on ``&`` and ``;`` (some
servers split on both), and a multipart part's name is read from every ``name``/``name*``
parameter of its ``Content-Disposition`` (two that disagree → 400). The multipart body is parsed
as a stream by ``python-multipart``: only the small fields asked for are kept, a file part's
bytes go to a sink (the batch-file scanner) or nowhere.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote, unquote_plus

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

from proxy.surfaces.errors import BodyError, invalid

MAX_FIELD_BYTES = 4096
_PAIR_SEP = re.compile(r"[&;]")
_PARAM = re.compile(
    r"""(?:^|;)\s*([A-Za-z0-9_!#$%&'*+.^`|~-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)""", re.DOTALL
)
_SAFE_TRANSFER = frozenset({"", "7bit", "8bit", "binary"})


def field_key(name: str) -> str:
    return name.strip().casefold()


def pairs_of(text: str, *, plus_is_space: bool) -> list[tuple[str, str]]:
    """``key=value`` pairs of a query string or urlencoded body (strict UTF-8)."""
    decode = unquote_plus if plus_is_space else unquote
    out: list[tuple[str, str]] = []
    for item in _PAIR_SEP.split(text):
        if not item:
            continue
        key, _, value = item.partition("=")
        try:
            out.append((decode(key, errors="strict"), decode(value, errors="strict")))
        except UnicodeDecodeError:
            raise invalid("A form field is not valid UTF-8.") from None
    return out


def fields_named(pairs: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in pairs if field_key(k) == name]


def params_of(header_value: str) -> dict[str, list[str]]:
    """Every parameter of a header like Content-Type or Content-Disposition, by lower-cased name
    (``name*`` values, RFC 8187, decoded and listed under ``name``)."""
    out: dict[str, list[str]] = {}
    _, _, rest = header_value.partition(";")
    for match in _PARAM.finditer(";" + rest):
        key, value = match.group(1).lower(), match.group(2).strip()
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1], flags=re.DOTALL)
        if key.endswith("*"):
            key = key[:-1]
            _, _, encoded = value.partition("''")
            value = unquote(encoded, errors="replace")
        out.setdefault(key, []).append(value)
    return out


def single_param(params: dict[str, list[str]], name: str, what: str) -> str | None:
    values = set(params.get(name, ()))
    if len(values) > 1:
        raise invalid(f"The {what} has conflicting {name!r} parameters.")
    return next(iter(values), None)


@dataclass
class MultipartFields:
    """What a multipart body holds for the decision."""

    fields: dict[str, list[str]] = field(default_factory=dict)  # wanted field → values


class _Part:
    __slots__ = ("data", "header_name", "header_value", "headers", "name", "sink")

    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.header_name = bytearray()
        self.header_value = bytearray()
        self.name: str | None = None
        self.data = bytearray()
        self.sink: Callable[[bytes], None] | None = None


def multipart_fields(
    body: bytes,
    content_type: str,
    wanted: frozenset[str],
    file_sink: tuple[str, Callable[[bytes], None]] | None = None,
    result: MultipartFields | None = None,
) -> MultipartFields:
    """The ``wanted`` fields' values (into ``result``, filled as the parse goes); the part named
    ``file_sink[0]`` streamed to its sink."""
    boundary = single_param(params_of(content_type), "boundary", "Content-Type")
    if not boundary:
        raise invalid("A multipart body needs a boundary in its Content-Type.")
    reader = _PartReader(wanted, file_sink, result if result is not None else MultipartFields())
    parser = MultipartParser(boundary, reader.callbacks(), max_header_count=32)
    try:
        parser.write(body)
        parser.finalize()
    except BodyError:
        raise
    except (MultipartParseError, ValueError):
        raise invalid("The multipart body is malformed.") from None
    if not reader.done:
        raise invalid("The multipart body ends before its closing boundary.")
    return reader.result


class _PartReader:
    """The parser's callbacks: each part's headers, then its data kept (a wanted field), streamed
    (the file part) or dropped."""

    def __init__(
        self,
        wanted: frozenset[str],
        file_sink: tuple[str, Callable[[bytes], None]] | None,
        result: MultipartFields,
    ) -> None:
        self.wanted = wanted
        self.file_sink = file_sink
        self.result = result
        self.part = _Part()
        self.done = False

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.part.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.part.header_value += data[start:end]

    def on_header_end(self) -> None:
        part = self.part
        name = part.header_name.decode("latin-1").strip().lower()
        part.headers.append((name, part.header_value.decode("latin-1")))
        part.header_name.clear()
        part.header_value.clear()

    def on_headers_finished(self) -> None:
        _classify(self.part, self.wanted, self.file_sink)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.part
        if part.sink is not None:
            part.sink(data[start:end])
        elif part.name is not None:
            part.data += data[start:end]
            if len(part.data) > MAX_FIELD_BYTES:
                raise invalid(f"The multipart field {part.name!r} is too long.")

    def on_part_end(self) -> None:
        part = self.part
        if part.name is not None and part.sink is None:
            try:
                value = part.data.decode("utf-8")
            except UnicodeDecodeError:
                raise invalid(f"The multipart field {part.name!r} is not valid UTF-8.") from None
            self.result.fields.setdefault(part.name, []).append(value)

    def on_end(self) -> None:
        self.done = True


def _classify(
    part: _Part,
    wanted: frozenset[str],
    file_sink: tuple[str, Callable[[bytes], None]] | None,
) -> None:
    disposition = [v for k, v in part.headers if k == "content-disposition"]
    if len(set(disposition)) > 1:
        raise invalid("A multipart part has conflicting Content-Disposition headers.")
    if not disposition:
        return
    names = {field_key(n) for n in params_of(disposition[0]).get("name", [])}
    if len(names) > 1:
        raise invalid("A multipart part has conflicting names.")
    name = next(iter(names), None)
    if name is None:
        return
    if file_sink is not None and name == file_sink[0]:
        part.sink = file_sink[1]
        return
    if name not in wanted:
        return
    transfer = {v.strip().lower() for k, v in part.headers if k == "content-transfer-encoding"}
    if not transfer <= _SAFE_TRANSFER:
        raise invalid(f"The multipart field {name!r} has an unsupported transfer encoding.")
    part.name = name
