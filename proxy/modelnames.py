"""Model names as operators and upstreams spell them (SPEC §3.3): which program a name belongs to.

A program's ``models`` entries are exact names or glob patterns (``*``, ``?``, ``[...]``). A
requested name belongs to an entry when, after :func:`normalize` (Unicode NFKC, case-folded,
surrounding whitespace trimmed), it

- equals the entry or matches its pattern,
- is a dated snapshot of it: ``<entry>-YYYY-MM-DD``,
- or is a fine-tune of it or of such a snapshot: ``ft:<entry>:…``.

The snapshot and fine-tune forms are applied to patterns too (a fine-tune of a model a pattern
covers runs that model). Each entry is therefore a small language of four globs, and
:func:`conflicts` finds two entries of different programs whose languages share a name, which
``config`` reports as an error: no name can belong to two programs.

:class:`ModelMatcher` is built once per config and shared by the data plane, ``explain``,
``GET /v1/models`` filtering and grant model subsets. Its lookup of a listed name spelled as the
config spells it is one dict probe.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_GLOB_CHARS = frozenset("*?[")
_SNAPSHOT = re.compile(r"(.+)-\d{4}-\d{2}-\d{2}")
_DATE_GLOB = "-[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]"
_CACHE_MAX = 4096


def normalize(name: str) -> str:
    """The form names are compared in: NFKC, case-folded, surrounding whitespace trimmed."""
    if name.isascii():
        return name.strip().lower()
    return unicodedata.normalize("NFKC", name).casefold().strip()


def is_pattern(entry: str) -> bool:
    return any(c in _GLOB_CHARS for c in entry)


# --------------------------------------------------------------------------- globs as tokens


@dataclass(frozen=True, slots=True)
class Token:
    """One glob element: a literal character, ``*``, or a character set (``?`` is an empty
    negated set: any one character)."""

    kind: str  # "lit" | "star" | "set"
    char: str = ""
    negated: bool = False
    ranges: tuple[tuple[str, str], ...] = ()


_STAR = Token("star")
_ANY = Token("set", negated=True)


def glob_tokens(pattern: str) -> tuple[Token, ...]:
    """fnmatch's syntax: ``*``, ``?``, ``[seq]``, ``[!seq]`` (an unclosed ``[`` is literal)."""
    out: list[Token] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            if not out or out[-1] != _STAR:
                out.append(_STAR)
        elif c == "?":
            out.append(_ANY)
        elif c == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                out.append(Token("lit", "["))
                continue
            out.append(_char_set(pattern[i:j]))
            i = j + 1
        else:
            out.append(Token("lit", c))
    return tuple(out)


def _char_set(body: str) -> Token:
    negated = body.startswith("!")
    if negated:
        body = body[1:]
    ranges: list[tuple[str, str]] = []
    k = 0
    while k < len(body):
        if k + 2 < len(body) and body[k + 1] == "-":
            if body[k] <= body[k + 2]:
                ranges.append((body[k], body[k + 2]))
            k += 3
        else:
            ranges.append((body[k], body[k]))
            k += 1
    return Token("set", negated=negated, ranges=tuple(ranges))


def _in_ranges(ch: str, ranges: tuple[tuple[str, str], ...]) -> bool:
    return any(lo <= ch <= hi for lo, hi in ranges)


def _one_char_sets_meet(a: Token, b: Token) -> bool:
    """Whether some single character satisfies both (non-star) tokens."""
    if a.kind == "lit" and b.kind == "lit":
        return a.char == b.char
    if a.kind == "lit" or b.kind == "lit":
        lit, other = (a, b) if a.kind == "lit" else (b, a)
        return _in_ranges(lit.char, other.ranges) != other.negated
    if a.negated and b.negated:
        return True  # the alphabet is not finite: some character is in neither
    if a.negated or b.negated:
        pos, neg = (b, a) if a.negated else (a, b)
        return any(_range_escapes(lo, hi, neg.ranges) for lo, hi in pos.ranges)
    return any(lo1 <= hi2 and lo2 <= hi1 for lo1, hi1 in a.ranges for lo2, hi2 in b.ranges)


def _range_escapes(lo: str, hi: str, excluded: tuple[tuple[str, str], ...]) -> bool:
    """Whether some character in [lo, hi] is outside every excluded range."""
    c = ord(lo)
    for elo, ehi in sorted(excluded):
        if ord(elo) > c:
            break
        c = max(c, ord(ehi) + 1)
        if c > ord(hi):
            return False
    return c <= ord(hi)


def _matches_one(tok: Token, ch: str) -> bool:
    if tok.kind == "star":
        return True
    if tok.kind == "lit":
        return tok.char == ch
    return _in_ranges(ch, tok.ranges) != tok.negated


def _common_char(a: Token, b: Token) -> str | None:
    candidates = [t.char for t in (a, b) if t.kind == "lit"]
    candidates += [c for t in (a, b) for lo, hi in t.ranges for c in (lo, hi)]
    candidates += ["a", "0", "-", "z", "_"]
    found = next((c for c in candidates if _matches_one(a, c) and _matches_one(b, c)), None)
    if found is None and _one_char_sets_meet(
        _ANY if a.kind == "star" else a, _ANY if b.kind == "star" else b
    ):
        # Two negated sets that exclude every candidate above: look further.
        found = next(
            (
                chr(c)
                for c in range(0x20, 0x110000)
                if _matches_one(a, chr(c)) and _matches_one(b, chr(c))
            ),
            None,
        )
    return found


def common_name(a: tuple[Token, ...], b: tuple[Token, ...]) -> str | None:
    """A string both glob token sequences match, or None when there is none (a search over
    position pairs; a star may match nothing or consume a character and stay)."""
    parent: dict[tuple[int, int], tuple[tuple[int, int], str] | None] = {(0, 0): None}
    todo = [(0, 0)]
    while todo:
        state = todo.pop(0)
        i, j = state
        if i == len(a) and j == len(b):
            out: list[str] = []
            step = parent[state]
            while step is not None:
                state, ch = step
                out.append(ch)
                step = parent[state]
            return "".join(reversed(out))
        ta = a[i] if i < len(a) else None
        tb = b[j] if j < len(b) else None
        moves: list[tuple[tuple[int, int], str]] = []
        if ta == _STAR:
            moves.append(((i + 1, j), ""))
        if tb == _STAR:
            moves.append(((i, j + 1), ""))
        if ta is not None and tb is not None:
            one = _common_char(ta, tb)
            if one is not None:
                moves.append(((i if ta == _STAR else i + 1, j if tb == _STAR else j + 1), one))
        for nxt, ch in moves:
            if nxt not in parent:
                parent[nxt] = (state, ch)
                todo.append(nxt)
    return None


def globs_intersect(a: tuple[Token, ...], b: tuple[Token, ...]) -> bool:
    """Whether some string matches both glob token sequences."""
    return common_name(a, b) is not None


def entry_language(entry: str) -> tuple[tuple[Token, ...], ...]:
    """The names an (already normalized) entry covers, as globs: itself, its dated snapshots,
    and fine-tunes of either."""
    e = entry if is_pattern(entry) else _escape(entry)
    return tuple(glob_tokens(g) for g in (e, e + _DATE_GLOB, f"ft:{e}:*", f"ft:{e}{_DATE_GLOB}:*"))


def _escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    parts: list[str] = []
    for tok in glob_tokens(pattern):
        if tok.kind == "lit":
            parts.append(re.escape(tok.char))
        elif tok.kind == "star":
            parts.append(".*")
        else:
            ranges = "".join(
                re.escape(lo) if lo == hi else f"{re.escape(lo)}-{re.escape(hi)}"
                for lo, hi in tok.ranges
            )
            if not ranges:
                parts.append("." if tok.negated else "(?!)")
            else:
                parts.append(f"[{'^' if tok.negated else ''}{ranges}]")
    body = "".join(parts)
    date = r"-\d{4}-\d{2}-\d{2}"
    return re.compile(rf"(?:{body})(?:{date})?|ft:(?:{body})(?:{date})?:.*", re.DOTALL)


# --------------------------------------------------------------------------- the matcher


@dataclass(frozen=True, slots=True)
class Conflict:
    program: str
    index: int  # position of the entry in its program's models
    entry: str
    other_program: str
    other_entry: str
    example: str  # a name that would belong to both


def conflicts(programs: Mapping[str, Iterable[str]]) -> list[Conflict]:
    """Entries (normalized) that share a name with an entry of an earlier program."""
    seen: list[tuple[str, str, tuple[tuple[Token, ...], ...]]] = []
    found: list[Conflict] = []
    for program, entries in programs.items():
        mine: list[tuple[str, str, tuple[tuple[Token, ...], ...]]] = []
        for index, raw in enumerate(entries):
            entry = normalize(raw)
            lang = entry_language(entry)
            for other_program, other_entry, other_lang in seen:
                example = next(
                    (n for x in lang for y in other_lang if (n := common_name(x, y)) is not None),
                    None,
                )
                if example is not None:
                    found.append(Conflict(program, index, raw, other_program, other_entry, example))
                    break
            mine.append((program, raw, lang))
        seen.extend(mine)
    return found


class ModelMatcher:
    """Name → owning key (a program name, or a grant's entry) under the rules above."""

    __slots__ = ("_cache", "_exact", "_patterns", "_raw")

    def __init__(self, entries: Iterable[tuple[str, str]]) -> None:
        """``entries``: (entry, owner) pairs, entries as written in config."""
        self._raw: dict[str, str] = {}
        self._exact: dict[str, str] = {}
        self._patterns: list[tuple[re.Pattern[str], str]] = []
        for entry, owner in entries:
            norm = normalize(entry)
            if is_pattern(norm):
                self._patterns.append((_glob_regex(norm), owner))
            else:
                self._raw.setdefault(entry, owner)
                self._exact.setdefault(norm, owner)
        self._cache: dict[str, str | None] = {}

    def owner_of(self, name: str) -> str | None:
        hit = self._raw.get(name)
        if hit is not None:
            return hit
        cached = self._cache.get(name, _UNSEEN)
        if cached is not _UNSEEN:
            return cached  # type: ignore[return-value]
        owner = self._lookup(normalize(name))
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[name] = owner
        return owner

    def _lookup(self, n: str) -> str | None:
        owner = self._exact_or_snapshot(n)
        if owner is None and n.startswith("ft:"):
            rest = n[3:]
            i = rest.find(":")
            while owner is None and i >= 0:
                owner = self._exact_or_snapshot(rest[:i])
                i = rest.find(":", i + 1)
        if owner is None:
            for regex, pattern_owner in self._patterns:
                if regex.fullmatch(n):
                    return pattern_owner
        return owner

    def _exact_or_snapshot(self, n: str) -> str | None:
        owner = self._exact.get(n)
        if owner is None:
            m = _SNAPSHOT.fullmatch(n)
            if m is not None:
                owner = self._exact.get(m.group(1))
        return owner


_UNSEEN: object = object()


@functools.lru_cache(maxsize=1024)
def subset_matcher(models: tuple[str, ...]) -> ModelMatcher:
    """A matcher for a grant's model subset (each entry owns itself)."""
    return ModelMatcher((m, m) for m in models)


def covered_by(models: tuple[str, ...], name: str) -> bool:
    """Whether ``name`` belongs to one of ``models`` (a grant's subset) under the same rules."""
    return subset_matcher(models).owner_of(name) is not None
