"""Canonical depot paths, and the rules that keep a path inside its mount.

Every interface (fsspec, HTTP, S3, FUSE, CLI) hands user-supplied paths to ``normalize_path``
before they reach the mount table, so this is the one place where traversal tricks are stopped.
A canonical path starts with ``/``, has no trailing ``/``, no empty or ``.`` segments, and is
never changed by normalizing it again.

What is rejected, and why:

* ``..`` segments: depot paths are resolved by prefix against the mount table, so a ``..`` would
  let a path under ``/models`` name an object outside the mount's UFS prefix.
* Control characters (C0, DEL, C1, NUL included), backslashes and lone surrogates: they mean
  different things to different layers (C strings, Windows-style separators, invalid UTF-8).
* Lookalikes of ``.``, ``/`` and ``\\``: characters that NFKC normalization turns into one of
  them (U+FF0E, U+2024, U+FE52, U+FF0F, U+FF3C, U+FE68, U+2100 "a/c" and friends), well-known
  slash confusables that NFKC leaves alone (U+2215, U+2044, U+29F8, ...), and segments whose NFKC
  form is ``.`` or ``..`` (U+2025). A layer below that normalizes Unicode must not see a
  different path than the one checked here.
* Percent escapes that smuggle a separator. HTTP boundaries decode a request path exactly once
  before calling ``normalize_path``, so anything that still looks percent-encoded here is either a
  literal ``%`` in a name or a second encoding aimed at a careless layer further down. The rule:
  decoding the path again, as many times as it still contains escapes, must never produce ``.``,
  ``/``, ``\\``, a control character or a lookalike from an escape, nor an overlong UTF-8 form of
  them (``%c0%ae``). So ``%2e%2e``, ``%2f``, ``%5c``, ``%00`` and ``%252e%252e`` are rejected,
  while ``100%``, ``50%off`` and ``%E3%81%82`` stay literal names. Escapes nested more than
  ``MAX_PERCENT_DEPTH`` levels deep are rejected outright.
* Paths over ``MAX_PATH_BYTES`` and segments over ``MAX_SEGMENT_BYTES`` (UTF-8), as POSIX does.
"""

from __future__ import annotations

import functools
import re
import unicodedata

from depot.core.errors import InvalidPath

MAX_PATH_BYTES = 4096
MAX_SEGMENT_BYTES = 255
MAX_PERCENT_DEPTH = 4
SCHEME = "depot://"

# Inputs longer than this are refused before any parsing, so a hostile request costs O(1).
_MAX_INPUT_CHARS = 2 * MAX_PATH_BYTES + len(SCHEME)

# Non-ASCII characters that NFKC maps to '.', '/' or '\\' (or to text containing '/'), and
# common confusables of '/' and '\\' that NFKC leaves as they are. The unit tests check the NFKC
# part of this table against ``unicodedata`` so a Unicode update cannot silently open a gap.
NFKC_DOT_LOOKALIKES = "\u2024\ufe52\uff0e"
NFKC_SEPARATOR_LOOKALIKES = "\u2100\u2101\u2105\u2106\ufe68\uff0f\uff3c"
CONFUSABLE_SEPARATORS = "\u1735\u2044\u2215\u2216\u2571\u29f5\u29f8\u29f9"
_LOOKALIKES = NFKC_DOT_LOOKALIKES + NFKC_SEPARATOR_LOOKALIKES + CONFUSABLE_SEPARATORS

# One scan finds every character that is never allowed in a path.
_FORBIDDEN_CLASS = "\x00-\x1f\x7f-\x9f\\\\\ud800-\udfff" + re.escape(_LOOKALIKES)
_FORBIDDEN_RE = re.compile(f"[{_FORBIDDEN_CLASS}]")
# What an escape must never decode to: the above, plus plain '.' and '/'.
_FORBIDDEN_DECODED_RE = re.compile(f"[./{_FORBIDDEN_CLASS}]")
_OTHER_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_ESCAPE_RUN_RE = re.compile(r"(?:%[0-9A-Fa-f]{2})+")
# Overlong UTF-8 lead bytes: C0/C1 (2 bytes), E0 80-9F (3 bytes), F0 80-8F (4 bytes).
_OVERLONG_RE = re.compile(rb"[\xc0\xc1]|\xe0[\x80-\x9f]|\xf0[\x80-\x8f]")


def _display(path: str, limit: int = 200) -> str:
    """A form of an offending path that is safe to put in an error message or a log line."""
    shown = path if len(path) <= limit else path[:limit] + "..."
    return ascii(shown) if _FORBIDDEN_RE.search(shown) else repr(shown)


def _describe(char: str) -> str:
    name = unicodedata.name(char, "")
    return f"U+{ord(char):04X}" + (f" {name}" if name else "")


def _reject_char(path: str, char: str) -> InvalidPath:
    shown = _display(path)
    if char == "\x00":
        return InvalidPath("path contains a NUL byte", shown)
    if char == "\\":
        return InvalidPath("path contains a backslash; depot paths use '/' as separator", shown)
    if "\ud800" <= char <= "\udfff":
        return InvalidPath("path is not valid UTF-8 (lone surrogate)", shown)
    if char in _LOOKALIKES:
        return InvalidPath(
            f"path escapes its mount: {_describe(char)} is a lookalike of '.', '/' or '\\'", shown
        )
    return InvalidPath(f"path contains a control character ({_describe(char)})", shown)


def _has_nfkc_separator(text: str) -> bool:
    folded = unicodedata.normalize("NFKC", text)
    return "." in folded or "/" in folded or "\\" in folded


def _check_percent(path: str) -> None:
    """Reject percent escapes that would turn into a separator if decoded again (see module doc)."""
    text = path
    for _ in range(MAX_PERCENT_DEPTH + 1):
        runs = list(_ESCAPE_RUN_RE.finditer(text))
        if not runs:
            return
        pieces: list[str] = []
        pos = 0
        for run in runs:
            raw = bytes.fromhex(run.group().replace("%", ""))
            if _OVERLONG_RE.search(raw):
                raise InvalidPath(
                    "path escapes its mount: overlong UTF-8 percent-encoding "
                    f"({run.group()!r}) is not allowed",
                    _display(path),
                )
            decoded = raw.decode("utf-8", errors="replace")
            bad = _FORBIDDEN_DECODED_RE.search(decoded)
            if bad is not None:
                char = bad.group()
                what = repr(char) if char in "./\\" else _describe(char)
                raise InvalidPath(
                    f"path escapes its mount: percent-encoded {what} ({run.group()!r}); "
                    "paths are decoded exactly once, at the boundary",
                    _display(path),
                )
            if not decoded.isascii() and _has_nfkc_separator(decoded):
                raise InvalidPath(
                    f"path escapes its mount: percent-encoded lookalike of '.' or '/' "
                    f"({run.group()!r})",
                    _display(path),
                )
            pieces.append(text[pos : run.start()])
            pieces.append(decoded)
            pos = run.end()
        pieces.append(text[pos:])
        text = "".join(pieces)
    raise InvalidPath(
        f"path is percent-encoded more than {MAX_PERCENT_DEPTH} levels deep", _display(path)
    )


def _normalize(path: str) -> str:
    if len(path) > _MAX_INPUT_CHARS:
        raise InvalidPath(f"path is longer than {MAX_PATH_BYTES} bytes", _display(path))
    text = path
    if text[:8].lower() == SCHEME:
        text = text[8:]
    elif _OTHER_SCHEME_RE.match(text):
        raise InvalidPath("not a depot path (only depot:// URIs are accepted)", _display(path))
    bad = _FORBIDDEN_RE.search(text)
    if bad is not None:
        raise _reject_char(path, bad.group())
    if "%" in text:
        _check_percent(text)
    ascii_only = text.isascii()
    segments: list[str] = []
    total = 0
    for segment in text.split("/"):
        if not segment or segment == ".":
            continue
        if segment == "..":
            raise InvalidPath(
                "path escapes its mount: '..' segments are not allowed", _display(path)
            )
        if ascii_only:
            size = len(segment)
        else:
            size = len(segment.encode("utf-8"))
            if unicodedata.normalize("NFKC", segment) in (".", ".."):
                raise InvalidPath(
                    f"path escapes its mount: segment {segment!r} is a lookalike of '.' or '..'",
                    _display(path),
                )
        if size > MAX_SEGMENT_BYTES:
            raise InvalidPath(
                f"path segment is longer than {MAX_SEGMENT_BYTES} bytes", _display(path)
            )
        total += size + 1
        segments.append(segment)
    if total > MAX_PATH_BYTES:
        raise InvalidPath(f"path is longer than {MAX_PATH_BYTES} bytes", _display(path))
    return "/" + "/".join(segments)


def normalize_path(path: str | bytes) -> str:
    """The canonical form of a depot path, or ``InvalidPath`` if it is unsafe or malformed.

    Accepts ``depot://a/b``, ``depot:///a/b``, ``/a/b`` and ``a/b`` (all give ``/a/b``); ``""``
    is the root. Bytes must be UTF-8 (FUSE hands over raw names). Results are memoized: the same
    paths come back on every page read.
    """
    if isinstance(path, bytes):
        try:
            path = path.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidPath("path is not valid UTF-8", ascii(path[:200])) from None
    elif not isinstance(path, str):
        raise InvalidPath(f"path must be a string, not {type(path).__name__}")
    if len(path) <= _CACHED_INPUT_CHARS:
        return _normalize_cached(path)
    return _normalize(path)


# Bounded in entries and in entry size, so hostile inputs cannot grow it beyond a few MiB.
_CACHED_INPUT_CHARS = 512
_normalize_cached = functools.lru_cache(maxsize=8192)(_normalize)


def split_path(path: str) -> list[str]:
    """The segments of a path (``[]`` for the root)."""
    canonical = normalize_path(path)
    return canonical[1:].split("/") if canonical != "/" else []


def join_path(parent: str, name: str) -> str:
    """``name`` (one segment or a relative path) under ``parent``; ``..`` is still refused.

    A leading ``/`` in ``name`` does not make it absolute: the result always lies under
    ``parent``, which is what a listing or a relative key needs.
    """
    base = normalize_path(parent)
    rest = normalize_path(name)
    if rest == "/":
        return base
    return rest if base == "/" else base + rest


def parent_of(path: str) -> str:
    """The directory holding ``path``; the root is its own parent."""
    canonical = normalize_path(path)
    cut = canonical.rfind("/")
    return canonical[:cut] or "/"


def basename(path: str) -> str:
    """The last segment of ``path`` (``""`` for the root)."""
    canonical = normalize_path(path)
    return canonical[canonical.rfind("/") + 1 :]


def is_within(path: str, ancestor: str) -> bool:
    """Whether canonical ``path`` is ``ancestor`` or lies below it, on segment boundaries."""
    if ancestor == "/":
        return path.startswith("/")
    return path == ancestor or path.startswith(ancestor + "/")
