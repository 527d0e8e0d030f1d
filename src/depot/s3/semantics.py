"""HTTP semantics of S3 GET/HEAD: ranges, conditional requests, dates, ETags, content types.

S3 follows RFC 9110 here, with its own choices where the RFC leaves room:

- ``Range``: one range only (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``); a header that does not
  parse, or asks for several ranges, is ignored (the whole object, 200); a range that starts at
  or past the end of the object (or any range of an empty object) is ``InvalidRange`` (416);
- preconditions are evaluated in the RFC's order: ``If-Match`` (412), else
  ``If-Unmodified-Since`` (412); then ``If-None-Match`` (304), else ``If-Modified-Since`` (304).
  So ``If-Match`` true with ``If-Unmodified-Since`` false is 200, and ``If-None-Match`` false
  with ``If-Modified-Since`` true is 304, as the S3 documentation spells out. Dates that do not
  parse are ignored; times compare at one-second resolution (what ``Last-Modified`` carries).

Object attributes: a write's content headers (``Content-Type``, ``Cache-Control``,
``Content-Disposition``, ``Content-Encoding`` without ``aws-chunked``, ``Content-Language``) and
``x-amz-meta-*`` (at most 2 KiB of names and values, ``MetadataTooLarge``) are kept with the
object and sent back on GET/HEAD. A non-ASCII value is stored RFC 2047-encoded
(``=?UTF-8?B?...?=``), which is how AWS returns such values, and which every store can keep.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import mimetypes
from collections.abc import Mapping
from email.utils import formatdate, parsedate_tz

from depot.core.types import CONTENT_HEADERS, Attributes, FileStatus
from depot.s3.errors import S3Error

DEFAULT_CONTENT_TYPE = "binary/octet-stream"
META_PREFIX = "x-amz-meta-"
MAX_METADATA_BYTES = 2048
_CONTENT_TYPES: dict[str, str] = {}


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``[start, end)`` asked for by a ``Range`` header, or None for the whole object."""
    if header is None:
        return None
    spec = header.strip()
    if not spec.startswith("bytes="):
        return None
    spec = spec[6:].strip()
    if "," in spec:
        return None
    first, sep, last = spec.partition("-")
    first, last = first.strip(), last.strip()
    if not sep or (first and not first.isdigit()) or (last and not last.isdigit()):
        return None
    if len(first) > 20 or len(last) > 20:
        return None
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise _invalid_range(header, size)
        return max(0, size - suffix), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise _invalid_range(header, size)
    end = min(int(last) + 1, size) if last else size
    return start, end


def _invalid_range(header: str, size: int) -> S3Error:
    return S3Error(
        "InvalidRange",
        headers=[("Content-Range", f"bytes */{size}")],
        RangeRequested=header.strip()[:200],
        ActualObjectSize=str(size),
    )


def parse_http_date(value: str) -> int | None:
    """Seconds since the epoch of an HTTP date (RFC 1123, RFC 850, asctime); None if bad."""
    parsed = parsedate_tz(value)
    if parsed is None:
        return None
    try:
        return calendar.timegm(parsed[:9]) - (parsed[9] or 0)
    except (OverflowError, ValueError):
        return None


def http_date(ts: float) -> str:
    return formatdate(max(0, int(ts)), usegmt=True)


def _tags(header: str) -> list[str]:
    """The entity tags of an ``If-Match`` / ``If-None-Match`` list (``*`` included)."""
    tags: list[str] = []
    rest = header.strip()
    while rest:
        weak = rest.startswith("W/")
        if weak:
            rest = rest[2:]
        if rest.startswith('"'):
            close = rest.find('"', 1)
            if close < 0:
                tag, rest = rest, ""
            else:
                tag, rest = rest[: close + 1], rest[close + 1 :]
        else:
            # Unquoted (AWS accepts a bare ETag value): up to the next comma.
            cut = rest.find(",")
            bare, rest = (rest, "") if cut < 0 else (rest[:cut], rest[cut:])
            bare = bare.strip()
            tag = bare if bare == "*" else f'"{bare}"'
        tags.append(("W/" if weak else "") + tag)
        rest = rest.lstrip(" \t,")
    return tags


def etag_matches(header: str, etag: str, *, weak: bool) -> bool:
    """Whether ``etag`` (quoted) is in the list; weak comparison ignores ``W/``."""
    for tag in _tags(header):
        if tag == "*":
            return True
        if tag.startswith("W/"):
            if weak and tag[2:] == etag:
                return True
        elif tag == etag:
            return True
    return False


def check_preconditions(headers: Mapping[str, str], etag: str, mtime: float) -> int | None:
    """412 or 304 when a precondition says so, else None (serve the object)."""
    modified = int(mtime)
    if_match = headers.get("if-match")
    if if_match is not None:
        if not etag_matches(if_match, etag, weak=False):
            return 412
    else:
        since = headers.get("if-unmodified-since")
        if since is not None:
            when = parse_http_date(since)
            if when is not None and modified > when:
                return 412
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        if etag_matches(if_none_match, etag, weak=True):
            return 304
    else:
        since = headers.get("if-modified-since")
        if since is not None:
            when = parse_http_date(since)
            if when is not None and modified <= when:
                return 304
    return None


def s3_etag(status: FileStatus) -> str:
    """The quoted ETag S3 clients see for this version of an object.

    The under store's own ETag when it has one (an S3 UFS gives the object's MD5, so clients that
    check it keep working), else a digest of the version (size and mtime) with a ``-1`` suffix,
    the mark of an ETag that is not the MD5 of the body (as for multipart objects), so that no
    client mistakes it for one.
    """
    if status.etag:
        tag = status.etag.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        tag = tag.strip('"').replace('"', "")
        if tag:
            return f'"{tag}"'
    digest = hashlib.blake2b(status.version_tag.encode(), digest_size=16).hexdigest()
    return f'"{digest}-1"'


def content_type(key: str) -> str:
    """A content type from the key's extension (for objects with none stored); S3's default
    otherwise."""
    dot = key.rfind(".")
    if dot < 0 or "/" in key[dot:]:
        return DEFAULT_CONTENT_TYPE
    ext = key[dot:].lower()
    found = _CONTENT_TYPES.get(ext)
    if found is None:
        found = mimetypes.types_map.get(ext) or DEFAULT_CONTENT_TYPE
        if len(_CONTENT_TYPES) < 4096:
            _CONTENT_TYPES[ext] = found
    return found


def _stored_value(text: str) -> str:
    """A header value as it is kept: ASCII as sent, anything else RFC 2047-encoded UTF-8."""
    if text.isascii():
        return text
    return "=?UTF-8?B?" + base64.b64encode(_utf8(text)).decode("ascii") + "?="


def _utf8(text: str) -> bytes:
    """The UTF-8 bytes of a header value the server decoded as Latin-1: its own bytes when they
    are UTF-8, else the characters they stand for."""
    try:
        raw = text.encode("latin-1")
        raw.decode("utf-8")
    except UnicodeError:
        return text.encode("utf-8")
    return raw


def _content_encoding(value: str) -> str | None:
    """``Content-Encoding`` without ``aws-chunked``, the framing of the request body only."""
    kept = [c.strip() for c in value.split(",") if c.strip() and c.strip().lower() != "aws-chunked"]
    return ", ".join(kept) or None


def request_attributes(headers: Mapping[str, str]) -> Attributes | None:
    """The attributes a write asks for (lower-case header names); None if it names none."""
    found: dict[str, str] = {}
    for name in CONTENT_HEADERS:
        value: str | None = headers.get(name.lower())
        if value is not None and name == "Content-Encoding":
            value = _content_encoding(value)
        if value is not None:
            found[name] = _stored_value(value)
    metadata: dict[str, str] = {}
    size = 0
    for name, value in headers.items():
        if name.startswith(META_PREFIX) and len(name) > len(META_PREFIX):
            key = name[len(META_PREFIX) :]
            size += len(key) + len(_utf8(value))
            metadata[key] = _stored_value(value)
    if size > MAX_METADATA_BYTES:
        raise S3Error("MetadataTooLarge", Size=str(size), MaxSizeAllowed=str(MAX_METADATA_BYTES))
    if not found and not metadata:
        return None
    return Attributes.of(found, metadata)


def _header_value(value: str) -> str:
    """A value as a header line carries it: one line, UTF-8 bytes (the writer sends Latin-1)."""
    value = value.replace("\r", " ").replace("\n", " ")
    return value if value.isascii() else value.encode("utf-8").decode("latin-1")


def object_headers(
    attributes: Attributes | None, key: str, skip: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """GET/HEAD headers of an object's attributes: its content headers (``Content-Type`` from
    the key's extension when none is stored) and ``x-amz-meta-*``; ``skip``: names overridden."""
    out: list[tuple[str, str]] = []
    stored = attributes.content_type if attributes is not None else None
    if "Content-Type" not in skip:
        out.append(("Content-Type", _header_value(stored) if stored else content_type(key)))
    if attributes is None:
        return out
    for name, value in attributes.headers:
        if name != "Content-Type" and name not in skip:
            out.append((name, _header_value(value)))
    for name, value in attributes.metadata:
        out.append((META_PREFIX + name, _header_value(value)))
    return out
