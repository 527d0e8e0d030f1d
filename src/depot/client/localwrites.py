"""Local writes: a write-back write to a worker on this node, staged by the writer itself.

A write over HTTP costs a write-back checkpoint three passes over its bytes on one node: the
client's spool, the loopback socket and the worker's staging file. When the path's owner runs on
this node (the short-circuit check: same kernel boot id, its cache dirs visible here) and the
path's mount is ``write-back``, the client instead asks the owner for a staging file
(``POST /api/v1/write/open``), writes the content into it, computes its xxh3_64 as it goes,
fsyncs it and commits it (``POST /api/v1/write/commit``). The worker checks the size, fsyncs the
file and its directory and journals it: the same acknowledgement as a write over HTTP, after
one pass over the bytes. A write known to be smaller than ``LOCAL_WRITE_MIN`` goes over HTTP
(one request instead of two). If the file cannot be opened here (another node, another user), the
slot is given back and the write goes over HTTP; a write abandoned before its commit is dropped
(``POST /api/v1/write/abort``, or by the worker after ``slot_ttl``) and nothing is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import xxhash

from depot.core.directio import DirectIO, pwrite_all
from depot.core.errors import DepotError, InvalidArgument
from depot.core.transport import ConnectionPool, error_from_response
from depot.core.types import Attributes, FileStatus

log = logging.getLogger(__name__)

OPEN = "/api/v1/write/open"
COMMIT = "/api/v1/write/commit"
ABORT = "/api/v1/write/abort"
ATTRIBUTES_HEADER = "X-Depot-Attributes"  # of a write: Attributes.to_dict() as JSON
# A write known to be smaller than this goes over HTTP even where a local write applies: its one
# request costs less than the slot's two (open and commit), and the worker acknowledges a small
# write with a single fsync (docs/writes.md, "Small writes").
LOCAL_WRITE_MIN = 256 * 1024
# Small writes are gathered into this much before they reach the staging file; larger ones go
# straight through (io.BufferedWriter does not copy them).
BUFFER = 1024 * 1024
COPY_CHUNK = 8 * 1024 * 1024


def attribute_headers(attributes: Attributes | None) -> list[tuple[str, str]]:
    """The header that carries a write's attributes (none without them)."""
    if attributes is None:
        return []
    # ASCII JSON: any value survives a header, which is Latin-1 on the wire.
    return [(ATTRIBUTES_HEADER, json.dumps(attributes.to_dict()))]


@dataclass(frozen=True, slots=True)
class Slot:
    """A staging file the owner worker lent for one write (``POST /api/v1/write/open``):
    write it, fsync it, then ``commit`` (or ``abort``)."""

    pool: ConnectionPool
    path: str
    token: str
    file: str

    async def commit(
        self, size: int, checksum: str, attributes: Attributes | None = None
    ) -> FileStatus:
        """Acknowledge the content (``size`` bytes, xxh3_64 hex ``checksum``) the caller wrote
        into ``file`` and fsync'd; returns the new status. ``NotFound`` when the worker no
        longer knows the slot (it expired, or the worker restarted): nothing was written."""
        target = (
            f"{COMMIT}?path={quote(self.path, safe='')}&token={self.token}"
            f"&size={size}&checksum={checksum}"
        )
        response = await self.pool.request(target, attribute_headers(attributes), method="POST")
        if response.status >= 300:
            raise error_from_response(response, self.path)
        return FileStatus.from_dict(response.json())

    async def abort(self) -> None:
        """Give the slot back: nothing is acknowledged and the worker drops its file."""
        try:
            await self.pool.request(f"{ABORT}?token={self.token}", method="POST")
        except (DepotError, OSError) as exc:  # the worker drops it after slot_ttl anyway
            log.debug("could not abort local write of %s: %s", self.path, exc)


async def request_slot(
    pool: ConnectionPool, path: str, size_hint: int | None = None
) -> Slot | None:
    """Ask the worker behind ``pool`` for a staging file of ``path``.

    None when the worker does not lend one for this path (not a write-back mount); errors that
    an HTTP write would meet too (read-only mount, full staging disk) are raised. The caller
    opens ``slot.file``: the worker made it (``O_EXCL``, a random name), so being able to open
    it here means it is the same file, on the same disk; if that fails, it aborts the slot.
    """
    target = f"{OPEN}?path={quote(path, safe='')}"
    if size_hint:
        target += f"&size={size_hint}"
    response = await pool.request(target, method="POST")
    if response.status in (404, 405, 501):  # an older worker, or not a write-back mount now
        return None
    if response.status >= 300:
        raise error_from_response(response, path)
    doc = response.json()
    return Slot(pool, path, str(doc["token"]), str(doc["file"]))


def checksum_of(fd: int, size: int) -> str:
    """xxh3_64 hex of the first ``size`` bytes of ``fd`` (blocking)."""
    hasher = xxhash.xxh3_64()
    buffer = bytearray(min(COPY_CHUNK, max(size, 1)))
    view = memoryview(buffer)
    pos = 0
    while pos < size:
        count = os.preadv(fd, [view[: min(len(buffer), size - pos)]], pos)
        if count <= 0:
            raise OSError(f"the file ended at {pos} of {size} bytes")
        hasher.update(view[:count])
        pos += count
    return hasher.hexdigest()


class LocalWrite:
    """One write being staged here, front to back: a slot's file open for writing.

    ``write`` is plain blocking file I/O, for any one thread at a time; ``commit`` and ``abort``
    run on the client's event loop.
    """

    def __init__(self, slot: Slot, fd: int, direct_io: DirectIO | None = None) -> None:
        self.slot = slot
        self.path = slot.path
        self.size = 0
        self._hasher = xxhash.xxh3_64()
        self._out = io.BufferedWriter(io.FileIO(fd, "wb", closefd=True), buffer_size=BUFFER)
        # The content goes to the disk with O_DIRECT where it can (core.directio): a checkpoint
        # is written once, not first into fresh page-cache pages. What the direct writer does
        # not take is written at its offset; the buffered writer serves filesystems that have
        # no O_DIRECT.
        self._direct = direct_io.open(slot.file, fd) if direct_io is not None else None
        self._done = False

    def write(self, data: Any) -> int:
        """Append ``data`` (any bytes-like object) to the staging file."""
        view = memoryview(data).cast("B")
        self._hasher.update(view)
        direct = self._direct
        if direct is None:
            self._out.write(view)
        elif not direct.write(view, self.size):
            pwrite_all(self._out.raw.fileno(), view, self.size)
        self.size += view.nbytes
        return view.nbytes

    def write_from(self, source: Any) -> None:
        """Append what is left of a binary file object (blocking)."""
        readinto = getattr(source, "readinto", None)
        if readinto is None:
            while block := source.read(COPY_CHUNK):
                self.write(block)
            return
        buffer = bytearray(COPY_CHUNK)
        view = memoryview(buffer)
        while n := readinto(view):
            self.write(view[:n])

    def finish(self) -> None:
        """Flush and fsync the staging file and close it (blocking): before ``commit``."""
        out = self._out
        if out.closed:
            return
        try:
            out.flush()
            if self._direct is not None:
                self._direct.flush()
            os.fsync(out.fileno())
        finally:
            self._close()

    def _close(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        self._out.close()

    async def commit(self, attributes: Attributes | None = None) -> FileStatus:
        """Hand the written file to the worker; returns the new status once it is acknowledged.

        Call ``finish`` first (or let this do it in a thread)."""
        if self._done:
            raise InvalidArgument("this local write was already committed or aborted", self.path)
        self._done = True
        if not self._out.closed:
            await asyncio.to_thread(self.finish)
        return await self.slot.commit(self.size, self._hasher.hexdigest(), attributes)

    async def abort(self) -> None:
        """Give up: nothing is acknowledged and the worker drops the staging file."""
        if self._done:
            return
        self._done = True
        with contextlib.suppress(OSError):
            self._close()
        await self.slot.abort()

