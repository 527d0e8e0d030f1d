"""Writes through a worker: whole-file put, delete, mkdir and rename (docs/writes.md).

Modes, per mount (``write_mode``):

- ``through``: the bytes go to the under store only; nothing is cached;
- ``cache-through``: the bytes go to the under store and, cut at page boundaries while they
  stream, into the page store under the new version, so the next read is all hits.

Either way the write is acknowledged only once the under store holds the object, and then this
worker's metadata for the path is the new object's status (a ``head`` after the put), the parent's
listing is dropped and the old version's pages are dropped. Writes of one path are serialized on
the worker (the last one to finish wins); clients send them to the path's ring owner, so two
writers of one path are ordered on one worker.

Small writes (up to ``multipart_threshold``) are held in memory and put in one request; larger
ones are uploaded in parts as they arrive (memory stays bounded). Object stores make a new object
visible only when the put (or the multipart upload) completes, so an upload cut short leaves
nothing under the final name and the old version is still served.

- ``write-back``: the body is streamed into the worker's ``WriteBackQueue`` (worker/writeback.py)
  and acknowledged once the staging file is fsync'd and its journal record written; the upload
  runs in the background. Until it lands, ``stat``/``open``/``read`` of the path on this worker
  serve the staged file under a provisional ETag (``wb-<checksum>-<seq>``); once it lands,
  ``on_uploaded`` records the object's status as the metadata, drops the parent's listing and the
  provisional pages. Deletes and renames of a path with a pending write-back sync it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any

from depot.core.errors import (
    AlreadyExists,
    ConfigError,
    IsADirectory,
    NotFound,
    ReadOnly,
    StaleVersion,
    Unavailable,
    Unsupported,
)
from depot.core.types import Attributes, FileId, FileStatus, PageId
from depot.namespace.mounts import Resolved
from depot.ufs.base import Buffer, ListPage, ObjectInfo, UnderStore, file_status
from depot.worker.service import ReadThroughService
from depot.worker.writeback import Ticket, WriteBackQueue

log = logging.getLogger(__name__)

DEFAULT_MULTIPART_THRESHOLD = 16 * 1024 * 1024
DEFAULT_PART_SIZE = 8 * 1024 * 1024
# Landed write-back writes whose provisional tag still opens the uploaded object.
LANDED_MEMORY = 4096


@dataclass(slots=True)
class WriteStats:
    writes: int = 0
    bytes_written: int = 0
    multipart_writes: int = 0
    local_writes: int = 0  # write-back writes a writer on this node staged itself
    pages_cached: int = 0
    deletes: int = 0
    renames: int = 0
    failed: int = 0

    def to_dict(self) -> dict[str, int]:
        return {
            "writes": self.writes,
            "bytes_written": self.bytes_written,
            "multipart_writes": self.multipart_writes,
            "local_writes": self.local_writes,
            "pages_cached": self.pages_cached,
            "deletes": self.deletes,
            "renames": self.renames,
            "failed": self.failed,
        }


class _PathLocks:
    """One lock per object URI, dropped when nobody holds or waits on it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, *keys: str) -> AsyncIterator[None]:
        ordered = sorted(set(keys))  # one global order: two renames cannot deadlock
        taken: list[str] = []
        acquired: set[str] = set()
        try:
            for key in ordered:
                lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
                self._locks[key] = (lock, users + 1)
                taken.append(key)
                await lock.acquire()
                acquired.add(key)
            yield
        finally:
            for key in reversed(taken):
                lock, users = self._locks[key]
                if key in acquired:
                    lock.release()
                if users <= 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


class _PageCutter:
    """Cuts a byte stream into pages of ``page_size`` (the last one may be shorter)."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._buf = bytearray()
        self.index = 0

    def add(self, data: Buffer) -> list[tuple[int, bytes]]:
        self._buf += data
        out: list[tuple[int, bytes]] = []
        size = self.page_size
        while len(self._buf) >= size:
            out.append((self.index, bytes(self._buf[:size])))
            del self._buf[:size]
            self.index += 1
        return out

    def finish(self) -> list[tuple[int, bytes]]:
        if not self._buf:
            return []
        out = [(self.index, bytes(self._buf))]
        self._buf.clear()
        self.index += 1
        return out



def _pread(path: str, start: int, end: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, max(0, end - start), start)
    finally:
        os.close(fd)


class StagedFile(UnderStore):
    """The bytes of one write-back write not uploaded yet, read from its staging file.

    Only ``get_range`` is served (the read path's page fills); once the upload has landed the
    staging file is gone and a read through this store raises ``StaleVersion`` (read again:
    the path's status is then the uploaded object's)."""

    def __init__(self, ticket: Ticket, path: str) -> None:
        self.ticket = ticket
        self.path = path
        self.uri = f"staged:{ticket.staging_path}"

    async def get_range(
        self, key: str, start: int, end: int, *, etag: str | None = None
    ) -> Buffer:
        end = min(end, self.ticket.size)
        try:
            return await asyncio.to_thread(_pread, str(self.ticket.staging_path), start, end)
        except FileNotFoundError:
            raise StaleVersion(
                "the written file was uploaded while it was being read; read it again", self.path
            ) from None

    async def get(self, key: str) -> Buffer:
        return await self.get_range(key, 0, self.ticket.size)

    def _no(self) -> Unsupported:
        return Unsupported("a staged write-back file only serves reads", self.path)

    async def head(self, key: str) -> ObjectInfo:
        raise self._no()

    async def list(
        self,
        prefix: str = "",
        *,
        delimiter: str | None = "/",
        token: str | None = None,
        limit: int = 1000,
    ) -> ListPage:
        raise self._no()

    async def put(
        self, key: str, data: Buffer, *, attributes: Attributes | None = None
    ) -> ObjectInfo:
        raise self._no()

    async def put_multipart(
        self,
        key: str,
        chunks: AsyncIterable[Buffer],
        *,
        part_size: int = 8 * 1024 * 1024,
        attributes: Attributes | None = None,
    ) -> ObjectInfo:
        raise self._no()

    async def delete(self, key: str) -> None:
        raise self._no()


def provisional_etag(ticket: Ticket) -> str:
    """The ETag a staged (not yet uploaded) write is served under."""
    return f"wb-{ticket.checksum}-{ticket.seq}"


class WriteService:
    """Writes of the namespace, on top of the read-through service's caches."""

    def __init__(
        self,
        service: ReadThroughService,
        *,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        part_size: int = DEFAULT_PART_SIZE,
    ) -> None:
        self.service = service
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self._locks = _PathLocks()
        self.stats = WriteStats()
        # Write-back (set by the daemon with ``attach_writeback``): the queue, the longest wait
        # of one sync call, and the staged writes this process acknowledged (object URI ->
        # (ticket, staged at)), kept until ``on_uploaded`` ran for them.
        self.writeback: WriteBackQueue | None = None
        self.sync_timeout = 20.0
        self._staged: dict[str, tuple[Ticket, float]] = {}

    # helpers ------------------------------------------------------------------------------------
    def _writable(self, path: str) -> Resolved:
        resolved = self.service.resolve(path)
        if resolved.mount.read_only:
            raise ReadOnly("the mount is read-only", resolved.path)
        return resolved

    def _file_target(self, path: str) -> Resolved:
        resolved = self._writable(path)
        if resolved.key == "":
            raise IsADirectory("is a directory (the root of a mount)", resolved.path)
        return resolved

    def _invalidate_parent(self, resolved: Resolved) -> None:
        key = resolved.key
        parent = key.rsplit("/", 1)[0] if "/" in key else ""
        metadata = self.service.metadata
        metadata.invalidate(resolved.mount.object_uri(parent) + "/")
        metadata.invalidate(resolved.uri + "/")

    async def _is_nonempty_dir(self, store: UnderStore, key: str) -> bool:
        page = await store.list(key + "/", delimiter="/", limit=1)
        return bool(page.objects or page.prefixes)

    def _committed(self, resolved: Resolved, info: ObjectInfo) -> FileStatus:
        status = file_status(resolved.path, info)
        self.service._record_status(resolved.uri, status)
        self._invalidate_parent(resolved)
        return status

    # write-back -----------------------------------------------------------------------------------
    def attach_writeback(self, queue: WriteBackQueue, *, sync_timeout: float = 20.0) -> None:
        """Serve ``write-back`` mounts with ``queue`` (and reads of its staged writes)."""
        self.writeback = queue
        self.sync_timeout = sync_timeout
        self.service.staged = self.staged_lookup

    def store_for_uri(self, ufs_uri: str) -> UnderStore:
        """The under store of the mount whose URI is ``ufs_uri`` (the queue's store factory)."""
        for mount in self.service.mounts.mounts:
            if mount.ufs_uri == ufs_uri:
                return self.service.store_for(mount)
        raise ConfigError(
            "no mount serves this under store any more; the staged write cannot be uploaded",
            ufs_uri,
        )

    def _staged_status(self, ticket: Ticket, path: str) -> FileStatus:
        known = self._staged.get(ticket.path)
        if known is not None and known[0].seq == ticket.seq:
            mtime = known[1]
        else:  # staged before a restart: the staging file's time
            try:
                mtime = os.stat(ticket.staging_path).st_mtime
            except OSError:
                mtime = time.time()
            self._staged[ticket.path] = (ticket, mtime)
        return FileStatus(
            path=path, size=ticket.size, mtime=mtime, etag=provisional_etag(ticket),
            attributes=ticket.attributes,
        )

    def staged_lookup(self, uri: str, path: str) -> tuple[FileStatus, UnderStore] | None:
        """Read-your-writes: the status and bytes of a staged write of ``uri`` not uploaded."""
        queue = self.writeback
        if queue is None:
            return None
        ticket = queue.pending(uri)
        if ticket is None:
            if uri in self._staged:
                # Uploaded, the hook has not run yet: what the cache remembers may be older.
                self.service.metadata.invalidate(uri)
            return None
        return self._staged_status(ticket, path), StagedFile(ticket, path)

    async def on_uploaded(self, ticket: Ticket, info: ObjectInfo) -> None:
        """A staged write reached the under store: it becomes this worker's metadata."""
        path = ticket.file_id or ticket.ufs_key
        status = file_status(path, info)
        self.service._record_status(ticket.path, status)
        known = self._staged.get(ticket.path)
        if known is not None and known[0].seq == ticket.seq:
            del self._staged[ticket.path]
        with contextlib.suppress(NotFound):
            self._invalidate_parent(self.service.resolve(path))
        served = FileStatus(path, 0, 0.0, etag=provisional_etag(ticket))
        landed = self.service.landed
        landed[served.entity_tag] = status.entity_tag
        while len(landed) > LANDED_MEMORY:
            landed.popitem(last=False)
        provisional = FileId(ticket.path, served.version_tag)
        with contextlib.suppress(OSError):
            await self.service.pages.delete_file(provisional.key)

    async def _write_back(
        self,
        resolved: Resolved,
        body: AsyncIterable[bytes],
        length: int,
        attributes: Attributes | None,
    ) -> FileStatus:
        queue = self.writeback
        if queue is None:
            raise Unavailable("write-back is not running on this worker", resolved.path)
        received = 0

        async def counted() -> AsyncIterator[bytes]:
            nonlocal received
            async for chunk in body:
                received += len(chunk)
                yield chunk
            if received != length:
                raise ConnectionResetError(f"the body ended after {received} of {length} bytes")

        ticket = await queue.stage(
            resolved.uri,
            resolved.key,
            counted(),
            store_uri=resolved.mount.ufs_uri,
            file_id=resolved.path,
            size_hint=length,
            attributes=attributes,
        )
        return self._acknowledged(resolved, ticket)

    def _acknowledged(self, resolved: Resolved, ticket: Ticket) -> FileStatus:
        """A write-back write of ``resolved`` was acknowledged: serve it from now on."""
        self._staged[resolved.uri] = (ticket, time.time())
        # Older statuses of the path must not be served once the staged file is gone.
        self.service.metadata.invalidate(resolved.uri)
        self._invalidate_parent(resolved)
        return self._staged_status(ticket, resolved.path)

    # short-circuit write-back writes -----------------------------------------------------------
    def _local_target(self, path: str) -> tuple[Resolved, WriteBackQueue]:
        resolved = self._file_target(path)
        if resolved.mount.write_mode != "write-back":
            raise Unsupported(
                f"local writes are for write-back mounts; this one is {resolved.mount.write_mode}",
                resolved.path,
            )
        queue = self.writeback
        if queue is None:
            raise Unavailable("write-back is not running on this worker", resolved.path)
        return resolved, queue

    async def open_local(self, path: str, size_hint: int | None = None) -> dict[str, Any]:
        """``POST /api/v1/write/open``: lend a staging file to a writer on this node.

        The writer fills and fsyncs the file itself, then commits it (``commit_local``): the
        bytes cross no socket and are written once. Only on write-back mounts."""
        resolved, queue = self._local_target(path)
        slot = await queue.open_slot(resolved.uri, size_hint)
        return {
            "path": resolved.path,
            "token": slot.token,
            "file": str(slot.staging_path),
            "ttl": queue.config.slot_ttl,
        }

    async def commit_local(
        self,
        path: str,
        token: str,
        size: int,
        checksum: str,
        *,
        attributes: Attributes | None = None,
    ) -> FileStatus:
        """``POST /api/v1/write/commit``: acknowledge the content of a lent staging file."""
        resolved, queue = self._local_target(path)
        try:
            if attributes is not None:
                self.service.store_for(resolved.mount).check_attributes(resolved.key, attributes)
            async with self._locks.hold(resolved.uri):
                ticket = await queue.adopt(
                    token,
                    resolved.uri,
                    resolved.key,
                    size,
                    checksum,
                    store_uri=resolved.mount.ufs_uri,
                    file_id=resolved.path,
                    attributes=attributes,
                )
                status = self._acknowledged(resolved, ticket)
        except BaseException:
            # The slot is gone if it was this path's (adopt drops it on any failure); another
            # path's commit naming it must not take it from its writer.
            self.stats.failed += 1
            raise
        self.stats.writes += 1
        self.stats.local_writes += 1
        self.stats.bytes_written += size
        return status

    async def abort_local(self, token: str) -> bool:
        """``POST /api/v1/write/abort``: the writer gave up; drop the slot and its file."""
        queue = self.writeback
        return queue is not None and await queue.discard_slot(token)

    async def _sync_pending(self, *uris: str) -> None:
        """Upload pending write-back writes of ``uris`` before a delete or a rename."""
        queue = self.writeback
        if queue is None:
            return
        for uri in uris:
            if queue.pending(uri) is not None:
                await queue.sync(uri, timeout=self.sync_timeout)

    async def sync(self, path: str | None, *, wait: bool, limit: float | None) -> dict[str, Any]:
        """``POST /api/v1/sync``: wait (up to ``limit`` s, at most ``sync_timeout``) until the
        write-back writes pending now (of ``path``, or all) are uploaded; report what is left."""
        queue = self.writeback
        uri: str | None = None
        if path is not None:
            uri = self.service.resolve(path).uri
        if queue is not None and wait:
            wait_s = self.sync_timeout if limit is None else min(limit, self.sync_timeout)
            await queue.sync(uri, timeout=wait_s)
        stats = queue.stats() if queue is not None else {}
        pending = (
            (queue.pending(uri) is not None if uri is not None else stats["queue_length"] > 0)
            if queue is not None
            else False
        )
        return {
            "path": path,
            "synced": not pending,
            "dirty_bytes": stats.get("dirty_bytes", 0),
            "queue_length": stats.get("queue_length", 0),
            "failures": stats.get("failures", []),
        }

    # write --------------------------------------------------------------------------------------
    async def write(
        self,
        path: str,
        body: AsyncIterable[bytes],
        length: int,
        *,
        attributes: Attributes | None = None,
    ) -> FileStatus:
        """Write ``length`` bytes from ``body`` as the whole new content of ``path``.

        Returns the new status once the under store holds the object. If ``body`` fails or ends
        early, the upload is aborted and the object (and the caches) keep the old version.
        ``attributes`` (content headers, user metadata) go with the object where the store
        keeps them.
        """
        resolved = self._file_target(path)
        mount = resolved.mount
        store = self.service.store_for(mount)
        if attributes is not None:
            store.check_attributes(resolved.key, attributes)  # refused before the body is read
        cache = mount.write_mode == "cache-through"
        pages = self.service.pages
        async with self._locks.hold(resolved.uri):
            if mount.write_mode == "write-back":
                try:
                    status = await self._write_back(resolved, body, length, attributes)
                except BaseException:
                    self.stats.failed += 1
                    raise
                self.stats.writes += 1
                self.stats.bytes_written += length
                return status
            try:
                if length <= self.multipart_threshold:
                    data = bytearray()
                    async for chunk in body:
                        data += chunk
                    if len(data) != length:
                        raise ConnectionResetError(
                            f"the body ended after {len(data)} of {length} bytes"
                        )
                    info = await store.put(resolved.key, bytes(data), attributes=attributes)
                    status = file_status(resolved.path, info)
                    if cache:
                        cutter = _PageCutter(pages.page_size)
                        final = FileId(resolved.uri, status.version_tag).key
                        for index, page in [*cutter.add(data), *cutter.finish()]:
                            await self._cache_page(PageId(final, index), page)
                else:
                    status = await self._write_multipart(
                        resolved, store, body, length, cache, attributes
                    )
            except BaseException:
                self.stats.failed += 1
                raise
            self.service._record_status(resolved.uri, status)
            self._invalidate_parent(resolved)
        self.stats.writes += 1
        self.stats.bytes_written += length
        return status

    async def _cache_page(self, page: PageId, data: bytes) -> None:
        try:
            if await self.service.pages.put(page, data):
                self.stats.pages_cached += 1
        except OSError as exc:  # a full or failing cache disk costs a later miss, not the write
            log.warning("could not cache written page %s: %s", page, exc)

    async def _write_multipart(
        self,
        resolved: Resolved,
        store: UnderStore,
        body: AsyncIterable[bytes],
        length: int,
        cache: bool,
        attributes: Attributes | None,
    ) -> FileStatus:
        """Upload in parts as the body arrives; with ``cache``, pages go to the page store under a
        provisional key meanwhile and move to the new version's key once it is known."""
        pages = self.service.pages
        pending = FileId(resolved.uri, f"w:{uuid.uuid4().hex}").key
        cutter = _PageCutter(pages.page_size) if cache else None
        received = 0

        async def chunks() -> AsyncIterator[Buffer]:
            nonlocal received
            async for chunk in body:
                received += len(chunk)
                if cutter is not None:
                    for index, page in cutter.add(chunk):
                        await self._put_quiet(PageId(pending, index), page)
                yield chunk
            if received != length:
                raise ConnectionResetError(f"the body ended after {received} of {length} bytes")
            if cutter is not None:
                for index, page in cutter.finish():
                    await self._put_quiet(PageId(pending, index), page)

        try:
            info = await store.put_multipart(
                resolved.key, chunks(), part_size=self.part_size, attributes=attributes
            )
            self.stats.multipart_writes += 1
            status = file_status(resolved.path, info)
            if cutter is not None:
                final = FileId(resolved.uri, status.version_tag).key
                for index in range(cutter.index):
                    data = await pages.get(PageId(pending, index))
                    if data is not None:
                        await self._cache_page(PageId(final, index), data)
            return status
        finally:
            if cutter is not None:
                with contextlib.suppress(OSError):
                    await pages.delete_file(pending)

    async def _put_quiet(self, page: PageId, data: bytes) -> None:
        try:
            await self.service.pages.put(page, data)
        except OSError as exc:
            log.warning("could not stage written page %s: %s", page, exc)

    # delete, mkdir, rename --------------------------------------------------------------------
    async def delete(self, path: str) -> None:
        """Delete a file. A directory is refused while it has entries (delete those first)."""
        resolved = self._file_target(path)
        store = self.service.store_for(resolved.mount)
        async with self._locks.hold(resolved.uri):
            await self._sync_pending(resolved.uri)
            try:
                await store.head(resolved.key)
            except NotFound:
                if await self._is_nonempty_dir(store, resolved.key):
                    raise IsADirectory(
                        "is a directory that is not empty (delete its files first)", resolved.path
                    ) from None
                raise
            await store.delete(resolved.key)
            self.service._record_status(resolved.uri, None)
            self._invalidate_parent(resolved)
        self.stats.deletes += 1

    async def mkdir(self, path: str) -> FileStatus:
        """Object stores have no directories: a directory exists while keys lie under it, so
        this creates nothing. It checks the path is writable and holds no file."""
        resolved = self._writable(path)
        if resolved.key:
            store = self.service.store_for(resolved.mount)
            try:
                await store.head(resolved.key)
            except NotFound:
                pass
            else:
                raise AlreadyExists("a file exists at this path", resolved.path)
        return FileStatus(path=resolved.path, size=0, mtime=0.0, is_dir=True)

    async def rename(self, src: str, dst: str) -> FileStatus:
        """Move a file: copy to ``dst``, then delete ``src`` (object stores have no rename, so
        for a moment both exist; a failure between the two leaves both)."""
        rs, rd = self._file_target(src), self._file_target(dst)
        if rs.uri == rd.uri:
            return await self.service.stat(rs.path)
        src_store = self.service.store_for(rs.mount)
        dst_store = self.service.store_for(rd.mount)
        async with self._locks.hold(rs.uri, rd.uri):
            await self._sync_pending(rs.uri, rd.uri)
            try:
                info = await src_store.head(rs.key)
            except NotFound:
                if await self._is_nonempty_dir(src_store, rs.key):
                    raise Unsupported("renaming a directory is not supported", rs.path) from None
                raise
            # The object keeps its attributes (None where the source store keeps none).
            if info.size <= self.multipart_threshold:
                data = await src_store.get_range(rs.key, 0, info.size, etag=info.etag)
                new = await dst_store.put(rd.key, data, attributes=info.attributes)
            else:
                new = await dst_store.put_multipart(
                    rd.key,
                    self._copy_chunks(src_store, rs.key, info),
                    part_size=self.part_size,
                    attributes=info.attributes,
                )
            status = self._committed(rd, new)
            await src_store.delete(rs.key)
            self.service._record_status(rs.uri, None)
            self._invalidate_parent(rs)
        self.stats.renames += 1
        return status

    async def _copy_chunks(
        self, store: UnderStore, key: str, info: ObjectInfo
    ) -> AsyncIterator[Buffer]:
        pos = 0
        while pos < info.size:
            end = min(info.size, pos + self.part_size)
            yield await store.get_range(key, pos, end, etag=info.etag)
            pos = end

    def stats_dict(self) -> dict[str, Any]:
        return self.stats.to_dict()

    def writeback_stats(self) -> dict[str, Any] | None:
        """The write-back queue's stats (dirty bytes, queue length, upload rate, oldest dirty
        age, failures...), or None where it is not running."""
        return self.writeback.stats() if self.writeback is not None else None
