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
"""

from __future__ import annotations

import calendar
import hashlib
import mimetypes
from collections.abc import Mapping
from email.utils import formatdate, parsedate_tz

from depot.core.types import FileStatus
from depot.s3.errors import S3Error

DEFAULT_CONTENT_TYPE = "binary/octet-stream"
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
    """A content type from the key's extension (depot stores none); S3's default otherwise."""
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
