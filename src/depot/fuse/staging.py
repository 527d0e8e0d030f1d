"""Files being written through a mount: a local spool per file, uploaded whole on close.

depot stores whole objects (docs/writes.md), so a file opened for writing is staged in an
anonymous temporary file under ``fuse.staging_dir`` (the bytes are on disk: memory stays
bounded) and uploaded whole with ``CacheClient.write`` when it is closed (``flush``) or
``fsync``'d. Every write lands at its offset in the spool (``os.pwrite``): appends, writes into
the middle, writes past the end (the hole reads as zeros) and truncation to any size all work.

An existing file opened without ``O_TRUNC`` starts as the stored object, untouched: reads go to
the stored version and its bytes are copied into the spool (read through the client, so from the
cache) by the first call that changes it — a write, or a truncation to a size other than 0.
Lazily rather than at open, because many such opens never need the old bytes: ``O_WRONLY`` then
``ftruncate(fd, 0)``, an ``O_RDWR`` open that only reads; a checkpoint of many GB is then not
downloaded for nothing, and an open stays one round trip. The copy is of the version current
when it starts, every chunk pinned to it; a version replaced meanwhile (a write-back upload
landing turns the provisional version into the store's own) restarts it. A copy that fails (no
worker, the under store down) empties the spool again and answers its error (``EIO``); the file
stays untouched, not dirty, so nothing is uploaded: a file with missing bytes never reaches the
store.

One lock per file orders the copy, every change and the upload: a write waits for the copy it
needs, and an upload sends a spool that nothing changes under it.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from typing import IO, Any, Protocol

import xxhash

from depot.client.localwrites import Slot, checksum_of
from depot.core.directio import DirectIO, DirectWriter, pwrite_all
from depot.core.errors import StaleVersion

#: Bytes copied into the spool per request: a few pages, fetched in parallel by the client,
#: with a buffer this size as the copy's only memory.
COPY_CHUNK = 8 * 1024 * 1024
#: Copies started over when the stored version changes under them, before ``StaleVersion``.
COPY_ATTEMPTS = 3


class Source(Protocol):
    """The stored file behind a spool."""

    async def refresh(self) -> int:
        """Look up the current version (later reads are pinned to it); returns its size."""

    async def read_into(self, start: int, end: int, out: memoryview) -> int:
        """Receive ``[start, end)`` of the pinned version into ``out``; returns the count
        (fewer only at the end of the file). ``StaleVersion`` if that version was replaced."""

    async def lend_slot(self) -> Slot | None:
        """A new staging file of the owner worker for this path (a local write), or None
        where local writes do not apply."""


def _spool(staging_dir: str | None) -> IO[bytes]:
    return tempfile.TemporaryFile(dir=staging_dir, prefix="depot-write-")


def _copy_file(src: int, dst: int, size: int) -> None:
    """Copy the first ``size`` bytes of ``src`` to ``dst`` in the kernel."""
    pos = 0
    while pos < size:
        count = os.copy_file_range(src, dst, size - pos, pos, pos)
        if count <= 0:
            raise OSError(f"copying a spool ended at {pos} of {size} bytes")
        pos += count


class Staged:
    """The spool of one file being written (shared by every open of it on the mount)."""

    def __init__(
        self,
        path: str,
        staging_dir: str | None,
        *,
        base_size: int,
        local: bool,
        slot: Slot | None = None,
        direct_io: DirectIO | None = None,
    ) -> None:
        self.path = path
        self._direct_io = direct_io
        self.staging_dir = staging_dir
        #: A staging file lent by the owner worker (a local write, docs/writes.md): the spool
        #: is that file, and the upload is its commit. None: an anonymous spool.
        self.slot = slot
        self.file: IO[bytes]
        if slot is not None:
            fd = os.open(slot.file, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            self.file = open(fd, "r+b", buffering=0)  # noqa: SIM115 (closed by close())
        else:
            self.file = _spool(staging_dir)
        #: Sequential runs into a slot's file bypass the page cache (core.directio); what it
        #: gathers is flushed before the file is read, copied, cut or fsync'd.
        self._direct = self._open_direct(slot, self.file.fileno(), 0)
        #: The xxh3 of the spool's first ``_hashed`` bytes, while writes come front to back
        #: (a checkpoint): the commit then needs no second pass. None after any other change.
        self._hasher: Any = xxhash.xxh3_64() if slot is not None else None
        self._hashed = 0
        #: The spool was committed as a slot: the worker owns that file now (it uploads it), so
        #: the next change first moves the content to a spool of this mount's own.
        self.frozen = False
        #: The spool holds the whole content (a new or truncated file, or the stored bytes were
        #: copied in). False while the file still is the stored object, untouched.
        self.local = local
        self.size = 0 if local else base_size
        #: Changes not uploaded yet; a new or truncated file is uploaded on close even when
        #: nothing was written (``touch``, ``: > file``).
        self.dirty = local
        #: The last upload failed: its error was reported; release does not try again.
        self.failed = False
        #: The name was removed (unlink, replaced by a rename): nothing is uploaded any more.
        self.unlinked = False
        self.handles = 0
        self.mtime = time.time()
        self.lock = asyncio.Lock()

    async def _load(self, source: Source) -> None:
        """Make the spool hold the whole content: copy the stored bytes in, once (the caller
        holds the lock)."""
        attempt = 1
        while not self.local:
            try:
                await self._copy(source)
            except StaleVersion:
                self.file.truncate(0)  # a partial copy is never read, written or uploaded
                if attempt >= COPY_ATTEMPTS:
                    raise
                attempt += 1
            except BaseException:
                self.file.truncate(0)
                raise

    async def _copy(self, source: Source) -> None:
        self._hasher = None  # bytes copied in: the commit hashes the spool
        size = self.size = await source.refresh()
        fd = self.file.fileno()
        buffer = memoryview(bytearray(min(COPY_CHUNK, size)))
        pos = 0
        while pos < size:
            end = min(size, pos + COPY_CHUNK)
            view = buffer[: end - pos]
            count = await source.read_into(pos, end, view)
            if count != end - pos:
                raise StaleVersion(
                    f"the stored file ended at {pos + count} while {size} bytes were copied",
                    self.path,
                )
            await asyncio.to_thread(pwrite_all, fd, view, pos)
            pos = end
        self.local = True

    def _changed(self) -> None:
        self.dirty = True
        self.failed = False
        self.mtime = time.time()

    def _open_direct(self, slot: Slot | None, fd: int, end: int) -> DirectWriter | None:
        if slot is None or self._direct_io is None:
            return None
        return self._direct_io.open(slot.file, fd, end)

    def _flush(self) -> None:
        """Put the bytes the direct writer gathered in the file (the caller holds the lock)."""
        if self._direct is not None:
            self._direct.flush()

    def _close_direct(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None

    async def _thaw(self, source: Source) -> None:
        """Before a change of a committed spool: copy it to a new one (the worker's file must
        not change under its upload). The new one is another slot of the worker where it lends
        one, so the next commit is again a local write; the content's hash carries over, so
        writes that go on at the end (an append after an ``fsync``, a ``dd`` whose duplicated
        descriptor was closed first) are not hashed again at the commit."""
        if not self.frozen:
            return
        committed, size = self.file, self.size
        slot = await source.lend_slot()
        spool: IO[bytes] | None = None
        if slot is not None:
            try:
                fd = os.open(slot.file, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
                spool = open(fd, "r+b", buffering=0)  # noqa: SIM115 (closed by close())
            except OSError:
                await slot.abort()
                slot = None
        if spool is None:
            spool = _spool(self.staging_dir)
        try:
            await asyncio.to_thread(_copy_file, committed.fileno(), spool.fileno(), size)
        except BaseException:
            spool.close()
            if slot is not None:
                await slot.abort()
            raise
        committed.close()
        self.file, self.frozen, self.slot = spool, False, slot
        self._direct = self._open_direct(slot, spool.fileno(), size)
        if slot is None:
            self._hasher = None

    def committed(self) -> None:
        """The slot was committed: its file is the worker's now, read-only here."""
        self.slot = None
        self.frozen = True
        self._close_direct()

    async def write(self, offset: int | None, data: bytes, source: Source) -> int:
        """Write ``data`` at ``offset`` (None: at the end, for ``O_APPEND``); a write past the
        end leaves a hole of zeros."""
        async with self.lock:
            await self._load(source)
            await self._thaw(source)
            at = self.size if offset is None else offset
            if self._direct is None or not self._direct.write(data, at):
                pwrite_all(self.file.fileno(), data, at)
            if self._hasher is not None:
                if at == self._hashed:
                    self._hasher.update(data)
                    self._hashed += len(data)
                else:
                    self._hasher = None  # not front to back: hashed again at commit
            self.size = max(self.size, at + len(data))
            self._changed()
            return len(data)

    async def truncate(self, size: int, source: Source) -> None:
        """Cut or extend (with zeros) the file to ``size``; to 0 needs no copy of the old bytes."""
        async with self.lock:
            if size == 0:
                self.local = True
            else:
                await self._load(source)
            await self._thaw(source)
            self._flush()
            self.file.truncate(size)
            if self.slot is not None and size == 0:
                self._hasher, self._hashed = xxhash.xxh3_64(), 0
            elif size != self._hashed:
                self._hasher = None
            self.size = size
            self._changed()

    def finish_slot(self) -> str:
        """fsync the slot's file; its content's xxh3 (blocking; the caller holds the lock)."""
        self._flush()
        fd = self.file.fileno()
        os.fsync(fd)
        if self._hasher is not None and self._hashed == self.size:
            return str(self._hasher.hexdigest())
        return checksum_of(fd, self.size)

    async def read(self, offset: int, size: int, source: Source) -> bytes:
        """Bytes of the file as this mount sees it: the spool, or the stored version while
        nothing changed it."""
        count = max(0, min(size, self.size - offset))
        if count == 0:
            return b""
        if self.local:
            if self._direct is not None and self._direct.end > offset:
                async with self.lock:
                    self._flush()
            return os.pread(self.file.fileno(), count, offset)
        buffer = bytearray(count)
        received = await source.read_into(offset, offset + count, memoryview(buffer))
        del buffer[received:]
        return bytes(buffer)

    def close(self) -> None:
        self._close_direct()
        self.file.close()


__all__ = ["COPY_ATTEMPTS", "COPY_CHUNK", "Source", "Staged"]
