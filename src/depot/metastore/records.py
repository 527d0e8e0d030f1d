"""What the metadata cache holds, and its on-disk encoding.

Values are compact JSON arrays (``[format, fetched_at, payload]``): fast through the C encoder,
readable when debugging, and safe to decode even if the bytes were damaged or written by someone
else, which pickle is not. ``decode_*`` raise ``ValueError`` for anything that is not exactly
what ``encode_*`` writes, so the store can drop the value instead of serving garbage.

A status row is ``[path, size, mtime, is_dir, etag, version]``, plus a seventh element, the
object's attributes ``[[[header, value]...], [[name, value]...]]``, when they are known: rows
written before attributes existed (six elements) still decode, with attributes None.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from depot.core.types import Attributes, FileStatus

FORMAT = 1

# ASCII output: lone surrogates (names read with surrogateescape) survive the round trip.
_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, check_circular=False)


@dataclass(frozen=True, slots=True)
class CachedStatus:
    """A cached ``stat``. ``status`` None is a negative entry: the object did not exist."""

    status: FileStatus | None
    fetched_at: float

    @property
    def exists(self) -> bool:
        return self.status is not None


@dataclass(frozen=True, slots=True)
class CachedListing:
    """A cached directory listing; every reader gets its own ``entries`` list."""

    entries: list[FileStatus]
    fetched_at: float


def _status_row(status: FileStatus) -> list[Any]:
    row = [status.path, status.size, status.mtime, status.is_dir, status.etag, status.version]
    attributes = status.attributes
    if attributes is not None:
        row.append([attributes.headers, attributes.metadata])
    return row


def _check_time(fetched_at: float) -> float:
    value = float(fetched_at)
    if not math.isfinite(value):
        raise ValueError(f"fetched_at must be a finite timestamp, not {fetched_at!r}")
    return value


def encode_status(status: FileStatus | None, fetched_at: float) -> bytes:
    row = None if status is None else _status_row(status)
    return _encoder.encode([FORMAT, _check_time(fetched_at), row]).encode("ascii")


def encode_listing(entries: Iterable[FileStatus], fetched_at: float) -> bytes:
    rows = [_status_row(entry) for entry in entries]
    return _encoder.encode([FORMAT, _check_time(fetched_at), rows]).encode("ascii")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional_str(value: object) -> bool:
    return value is None or isinstance(value, str)


def _parse_pairs(value: object) -> dict[str, str]:
    if not isinstance(value, list):
        raise ValueError("malformed attributes")
    out: dict[str, str] = {}
    for pair in value:
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not isinstance(pair[0], str)
            or not isinstance(pair[1], str)
        ):
            raise ValueError("malformed attributes")
        out[pair[0]] = pair[1]
    return out


def _parse_attributes(value: object) -> Attributes:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError("malformed attributes")
    return Attributes.of(_parse_pairs(value[0]), _parse_pairs(value[1]))


def _parse_row(row: object) -> FileStatus:
    if not isinstance(row, list) or len(row) not in (6, 7):
        raise ValueError("malformed status record")
    path, size, mtime, is_dir, etag, version = row[:6]
    if not (
        isinstance(path, str)
        and isinstance(size, int)
        and not isinstance(size, bool)
        and size >= 0
        and _is_number(mtime)
        and isinstance(is_dir, bool)
        and _optional_str(etag)
        and _optional_str(version)
    ):
        raise ValueError("malformed status record")
    attributes = _parse_attributes(row[6]) if len(row) == 7 else None
    return FileStatus(path, size, float(mtime), is_dir, etag, version, attributes)


def _parse_envelope(data: bytes) -> tuple[float, object]:
    try:
        value = json.loads(data)
    except RecursionError:
        raise ValueError("value nested too deeply") from None
    if (
        not isinstance(value, list)
        or len(value) != 3
        or type(value[0]) is not int
        or value[0] != FORMAT
    ):
        raise ValueError("not a metadata record of this format")
    fetched_at = value[1]
    if not _is_number(fetched_at) or not math.isfinite(fetched_at):
        raise ValueError("malformed fetch time")
    return float(fetched_at), value[2]


def decode_status(data: bytes) -> CachedStatus:
    fetched_at, payload = _parse_envelope(data)
    return CachedStatus(None if payload is None else _parse_row(payload), fetched_at)


def decode_listing(data: bytes) -> CachedListing:
    fetched_at, payload = _parse_envelope(data)
    if not isinstance(payload, list):
        raise ValueError("malformed listing record")
    return CachedListing([_parse_row(row) for row in payload], fetched_at)
