"""The write-back journal: an fsync'd, append-only log of framed, checksummed records.

Why a log file and not RocksDB: the journal holds a handful of small records per write and is
read in full only at start; what matters is a precise durability point. An ``os.write`` of one
whole frame followed by ``os.fsync`` is exactly that point, with no library buffering, WAL
options or background compaction to reason about, and a torn tail is easy to recognise and to
emulate in tests (truncate the file). Compaction is a rewrite of the live records into a temp
file, fsync, ``rename`` over the journal, fsync of the directory: atomic on POSIX.

File layout::

    MAGIC (8 bytes: b"DWBJ\\x00\\x00\\x00\\x01")
    frame*   where frame = <u32 length> <u64 xxh64(length bytes + payload)> payload
             and payload is one compact JSON object with a "t" (type) field.

Record types: ``staged`` (a write acknowledged to its client; its ``attrs``, the object's
content headers and user metadata, only when given: older records without it still replay; the
content itself, base64 in ``data``, for a small write whose staging file was not fsync'd),
``uploaded`` (it reached the under store), ``abandoned`` (it will never be uploaded: superseded
or dropped by an operator) and ``seq`` (the next sequence number, written by compaction so
numbers never go back).

Replay stops at the first frame that is short or fails its checksum. That frame is a torn tail
(a crash during the append: it was never acknowledged) when it reaches the end of the file or
only zero bytes follow it; it is then cut off. Anything else is corruption in the middle of the
log, and ``Corrupted`` is raised rather than silently dropping the acknowledged records after it.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from depot.core.errors import Corrupted

log = logging.getLogger(__name__)

MAGIC = b"DWBJ\x00\x00\x00\x01"
_HEADER = struct.Struct("<IQ")
MAX_RECORD = 1 << 20  # a record is at most a few KiB; anything larger is not ours

Record = dict[str, Any]


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (created, renamed, deleted files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_frame(record: Record) -> bytes:
    payload = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
    length = struct.pack("<I", len(payload))
    digest = xxhash.xxh64_intdigest(length + payload)
    return _HEADER.pack(len(payload), digest) + payload


@dataclass(slots=True)
class ReplayResult:
    records: list[Record]
    valid_bytes: int  # offset of the end of the last good frame
    torn_bytes: int  # bytes of a torn tail that were cut off


def decode(data: bytes, *, name: str = "journal") -> ReplayResult:
    """Parse a whole journal image; see the module doc for the torn-tail rule."""
    if len(data) < len(MAGIC):
        # Torn while being created: only a prefix of the magic (or nothing) reached the disk.
        if MAGIC.startswith(data) or not any(data):
            return ReplayResult([], 0, len(data))
        raise Corrupted("write-back journal has a bad header", name)
    if data[: len(MAGIC)] != MAGIC:
        raise Corrupted("write-back journal has a bad header", name)
    records: list[Record] = []
    pos = len(MAGIC)
    size = len(data)
    while pos < size:
        bad = False
        end = size + 1
        if size - pos < _HEADER.size:
            bad = True
        else:
            length, digest = _HEADER.unpack_from(data, pos)
            end = pos + _HEADER.size + length
            if length > MAX_RECORD or end > size:
                bad = True
            else:
                body = data[pos : pos + 4] + data[pos + _HEADER.size : end]
                if xxhash.xxh64_intdigest(body) != digest:
                    bad = True
                else:
                    try:
                        record = json.loads(data[pos + _HEADER.size : end])
                    except ValueError:
                        bad = True
                    else:
                        if not isinstance(record, dict) or "t" not in record:
                            bad = True
                        else:
                            records.append(record)
        if bad:
            rest = data[pos:]
            if end >= size or not any(rest[min(len(rest), max(0, end - pos)) :]):
                return ReplayResult(records, pos, size - pos)
            raise Corrupted(
                f"write-back journal is corrupt at offset {pos} of {size} "
                "(not a torn tail: acknowledged records follow)",
                name,
            )
        pos = end
    return ReplayResult(records, pos, 0)


class Journal:
    """An open journal file. Methods block (file IO and fsync): call them from a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self.appended = 0  # records appended since the last compaction

    @classmethod
    def replay(cls, path: Path) -> ReplayResult:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return ReplayResult([], 0, 0)
        result = decode(data, name=str(path))
        if result.torn_bytes:
            log.warning(
                "write-back journal %s: ignored a torn tail of %d bytes (an unacknowledged "
                "record cut by a crash)",
                path,
                result.torn_bytes,
            )
        return result

    def rewrite(self, records: Iterable[Record]) -> None:
        """Atomically replace the journal by ``records`` (compaction) and open it for appends."""
        self.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            for record in records:
                f.write(encode_frame(record))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.appended = 0

    def append(self, records: Iterable[Record]) -> None:
        """Append ``records`` and fsync: once this returns they survive a crash."""
        if self._fd is None:
            raise RuntimeError("journal is closed")
        frame = b"".join(encode_frame(r) for r in records)
        view = memoryview(frame)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)
        self.appended += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
