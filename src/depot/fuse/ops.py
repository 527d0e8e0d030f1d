"""The request handlers of a depot mount (pyfuse3's low-level API, asyncio mode).

Every handler runs as a task on the one event loop of the mount process, the same loop as the
``CacheClient``: a request that waits on the network never holds up another one, and no request
pays for a hand-off between threads. Handlers may only raise ``FUSEError``; every other error is
turned into its errno here (``depot.fuse.errors``).

Writes (``-o rw``): a file opened for writing is staged locally (``depot.fuse.staging``: writes
at any offset, appends, truncation) and uploaded whole on close with ``CacheClient.write``;
mkdir, rmdir, unlink and rename go to the client's calls of the same names. What an object
store cannot do answers ``EOPNOTSUPP`` or ``EPERM`` (docs/fuse.md#writes). A read-only mount is
``ro`` for the kernel, which answers ``EROFS`` itself; the handlers refuse too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import functools
import json
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3
from pyfuse3 import (
    EntryAttributes,
    FileHandleT,
    FileInfo,
    FileNameT,
    FlagT,
    FUSEError,
    InodeT,
    ModeT,
    ReaddirToken,
    RequestContext,
    SetattrFields,
    StatvfsData,
    XAttrNameT,
)

from depot.client.client import MIN_CHUNK, CacheClient
from depot.client.localwrites import Slot
from depot.core.config import DepotConfig
from depot.core.errors import AlreadyExists, DepotError, IsADirectory, NotFound
from depot.core.types import FileStatus
from depot.fuse.errors import errno_of
from depot.fuse.inodes import ROOT_INODE, Inode, InodeTable, join
from depot.fuse.reader import BLOCK_MIN, Block, BlockCache, FileData, Handle, Reader, Reply
from depot.fuse.staging import Staged

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
_STATFS_MAX_AGE = 5.0
_BLKSIZE = 1024 * 1024  # st_blksize: cp, cat and friends size their buffers from it
XATTR_VERSION = b"user.depot.version"  # the version (entity tag) of a file
XATTR_STATS = b"user.depot.stats"  # the mount's read counters, as JSON


def fuse_errors(fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Answer any failure of a handler with its errno (a handler may only raise ``FUSEError``)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except FUSEError:
            raise
        except Exception as exc:
            code = errno_of(exc)
            if code in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
                log.debug("%s: %s", fn.__name__, exc)
            else:
                log.warning("%s failed (%s): %s", fn.__name__, errno.errorcode.get(code, code), exc)
            raise FUSEError(code) from None

    return wrapper


def _refuse(code: int) -> FUSEError:
    return FUSEError(code)


@dataclass
class _WriteHandle:
    """An open file served from its spool: one opened for writing, or one opened for reading
    while the mount writes it (it reads the spool: read-your-writes)."""

    fh: int
    inode: Inode
    staged: Staged
    #: ``O_APPEND``: every write goes to the end of the spool, whatever offset the kernel sends.
    append: bool = False
    writable: bool = True


class _StoredFile:
    """The stored file of an inode as its spool reads it (``staging.Source``): through the
    client, so from the cache, pinned to the version the inode records, so that a copy never
    mixes two versions."""

    def __init__(self, ops: DepotOperations, node: Inode) -> None:
        self.ops = ops
        self.node = node

    async def refresh(self) -> int:
        node = self.node
        status = await self.ops._stat(node.path)
        if status.is_dir:
            raise IsADirectory("a directory now has this name", node.path)
        if self.ops.table.update(node, status) is not None:
            self.ops._changed(node)
        return status.size

    async def read_into(self, start: int, end: int, out: memoryview) -> int:
        node = self.node
        return await self.ops.client.read_range_into(
            node.path, start, end, out, version=node.version
        )

    async def lend_slot(self) -> Slot | None:
        try:
            return await self.ops.client.local_slot(self.node.path)
        except DepotError as exc:
            log.debug("no local write for %s: %s", self.node.path, exc)
            return None


@dataclass
class _DirHandle:
    inode: Inode
    entries: list[FileStatus] = field(default_factory=list)


class DepotOperations(pyfuse3.Operations):
    """The namespace of a depot cluster as a POSIX file system."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self, client: CacheClient, config: DepotConfig, page_size: int, *, writable: bool = False
    ) -> None:
        super().__init__()
        self.writable = writable
        self.client = client
        self.config = config
        settings = config.fuse
        self.settings = settings
        self.uid = settings.uid if settings.uid is not None else os.geteuid()
        self.gid = settings.gid if settings.gid is not None else os.getegid()
        # A writable mount shows writable modes unless they were set (the kernel checks them).
        chosen = settings.model_fields_set
        self.file_mode = settings.file_mode
        self.dir_mode = settings.dir_mode
        if writable and "file_mode" not in chosen:
            self.file_mode = 0o644
        if writable and "dir_mode" not in chosen:
            self.dir_mode = 0o755
        self.staging_dir = settings.staging_dir
        if writable and self.staging_dir:
            os.makedirs(self.staging_dir, exist_ok=True)
        #: Directories made with mkdir here: object stores show a directory only while it has
        #: entries, so an empty one lives in this mount until rmdir (or unmount).
        self.pending_dirs: set[str] = set()
        self.writers: dict[int, _WriteHandle] = {}
        self.writing: dict[int, Inode] = {}
        self.started_ns = time.time_ns()
        chunk = page_size * max(1, -(-MIN_CHUNK // page_size))
        block_size = chunk * max(1, -(-BLOCK_MIN // chunk))
        self.cache = BlockCache(block_size, settings.memory)
        self.reader = Reader(
            client,
            self.cache,
            read_ahead=config.client.read_ahead,
            prefetch=settings.prefetch,
            prefetch_segment=settings.prefetch_segment,
            random_threshold=settings.random_threshold,
            parallelism=config.client.parallelism,
            store=self._store,
        )
        root = FileStatus(path="/", size=0, mtime=0.0, is_dir=True)
        self.table = InodeTable(root)
        self.files: dict[int, Handle] = {}
        self.dirs: dict[int, _DirHandle] = {}
        self._next_fh = 1
        # Kernel cache calls block (on pages that reads have locked): they run on this thread.
        self._kernel = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="depot-fuse-kernel")
        self._can_store = True
        self._statfs: tuple[float, dict[str, Any] | None] = (0.0, None)

    # plumbing -----------------------------------------------------------------------------------
    @property
    def open_files(self) -> int:
        return len(self.files) + len(self.writers)

    def _fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _inode(self, ino: int) -> Inode:
        inode = self.table.get(ino)
        if inode is None:
            raise FUSEError(errno.ESTALE)
        return inode

    def _attrs(self, inode: Inode) -> EntryAttributes:
        status = inode.status
        entry = EntryAttributes()
        entry.st_ino = inode.ino
        entry.generation = 0
        entry.entry_timeout = self.settings.entry_timeout
        entry.attr_timeout = self.settings.attr_timeout
        if status.is_dir:
            entry.st_mode = stat.S_IFDIR | self.dir_mode
            entry.st_size = 0
            # 1, not 2: tools like find then do not infer the number of subdirectories from it.
            entry.st_nlink = 1
        else:
            entry.st_mode = stat.S_IFREG | self.file_mode
            staged = inode.staged
            entry.st_size = staged.size if staged is not None else status.size
            entry.st_nlink = 1
        entry.st_uid = self.uid
        entry.st_gid = self.gid
        entry.st_rdev = 0
        entry.st_blksize = _BLKSIZE
        entry.st_blocks = -(-entry.st_size // 512)
        seconds = inode.staged.mtime if inode.staged is not None else status.mtime
        mtime = int(seconds * 1_000_000_000) if seconds > 0 else self.started_ns
        entry.st_atime_ns = mtime
        entry.st_ctime_ns = mtime
        entry.st_mtime_ns = mtime
        return entry

    async def _stat(self, path: str) -> FileStatus:
        try:
            return await self.client.stat(path)
        except NotFound:
            if path == "/" or path in self.pending_dirs:
                # no mount at "/": the root is the directory above every mount
                return FileStatus(path=path, size=0, mtime=0.0, is_dir=True)
            raise

    def _record(self, path: str, status: FileStatus) -> Inode:
        inode, stale = self.table.remember(path, status)
        if stale is not None:
            self._changed(inode)
        return inode

    def _changed(self, inode: Inode) -> None:
        """The file has a new version: drop what the mount and the kernel hold of the old one."""
        log.info("%s changed (now %s): dropping cached data", inode.path, inode.version)
        if inode.data is not None:
            inode.data.close()
            inode.data = None
        if inode.cached_version is not None:
            inode.cached_version = None
            self._kernel_call(pyfuse3.invalidate_inode, inode.ino)

    def _kernel_call(self, fn: Callable[..., None], *args: Any) -> concurrent.futures.Future[None]:
        def run() -> None:
            try:
                fn(*args)
            except OSError as exc:
                # ENOENT: the kernel already forgot the inode; nothing is cached for it.
                if exc.errno == errno.ENOSYS and fn is pyfuse3.notify_store:
                    self._can_store = False
                log.debug("%s%r: %s", getattr(fn, "__name__", fn), args[:2], exc)

        return self._kernel.submit(run)

    def _store(self, data: FileData, block: Block) -> asyncio.Future[None] | None:
        """Push a prefetched block into the kernel page cache (when the kernel caches this version)."""
        inode = data.inode
        if (
            not self._can_store
            or data.closed
            or inode.cached_version != data.version
            or self.table.get(inode.ino) is not inode
        ):
            return None
        view = block.view[: block.count]
        future = self._kernel_call(pyfuse3.notify_store, inode.ino, block.start, view)
        return asyncio.wrap_future(future)

    def close(self) -> None:
        self._kernel.shutdown(wait=True)

    async def aclose(self) -> None:
        await self.reader.close()
        for inode in self.table.inodes():
            if inode.data is not None:
                inode.data.close()
        await asyncio.to_thread(self.close)

    # names and attributes -----------------------------------------------------------------------
    @fuse_errors
    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        parent = self._inode(parent_inode)
        if not parent.status.is_dir:
            raise FUSEError(errno.ENOTDIR)
        path = join(parent.path, os.fsdecode(name))
        known = self.table.by_path(path)
        if known is not None and known.staged is not None:  # being written: not in the store yet
            known.lookups += 1
            return self._attrs(known)
        try:
            status = await self._stat(path)
        except NotFound:
            if self.settings.negative_timeout > 0:
                entry = EntryAttributes()
                entry.st_ino = 0  # a negative entry, cached by the kernel for entry_timeout
                entry.entry_timeout = self.settings.negative_timeout
                return entry
            raise
        inode = self._record(path, status)
        inode.lookups += 1
        return self._attrs(inode)

    @fuse_errors
    async def getattr(self, inode: InodeT, ctx: RequestContext) -> EntryAttributes:
        node = self._inode(inode)
        if node.staged is not None:
            return self._attrs(node)
        status = await self._stat(node.path)
        if status.is_dir != node.status.is_dir and node.ino != ROOT_INODE:
            # The path now names something of another kind: this inode is gone.
            raise FUSEError(errno.ENOENT)
        stale = self.table.update(node, status)
        if stale is not None:
            self._changed(node)
        return self._attrs(node)

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        for ino, count in inode_list:
            gone = self.table.forget(ino, count)
            if gone is not None and gone.data is not None:
                gone.data.close()
                gone.data = None

    @fuse_errors
    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        checked, stats = self._statfs
        if time.monotonic() - checked > _STATFS_MAX_AGE:
            try:
                stats = await self.client.cache_stats()
            except Exception as exc:  # df must work even when the worker does not answer
                log.debug("statfs: cache stats unavailable: %s", exc)
                stats = None
            self._statfs = (time.monotonic(), stats)
        frsize = 4096
        capacity = int(stats.get("capacity_bytes", 0)) if stats else 0
        used = int(stats.get("used_bytes", 0)) if stats else 0
        result = StatvfsData()
        result.f_bsize = _BLKSIZE
        result.f_frsize = frsize
        result.f_blocks = capacity // frsize
        result.f_bfree = max(0, capacity - used) // frsize
        result.f_bavail = result.f_bfree
        result.f_files = len(self.table)
        result.f_ffree = 0
        result.f_favail = 0
        result.f_namemax = 255
        return result

    @fuse_errors
    async def getxattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> bytes:
        node = self._inode(inode)
        if name == XATTR_STATS:
            return json.dumps(self.stats(), sort_keys=True).encode()
        if name == XATTR_VERSION and node.version is not None:
            return node.version.encode()
        raise FUSEError(pyfuse3.ENOATTR)

    @fuse_errors
    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> Sequence[XAttrNameT]:
        node = self._inode(inode)
        return [XATTR_STATS] if node.version is None else [XATTR_VERSION, XATTR_STATS]

    def stats(self) -> dict[str, int]:
        """Counters of the read path (for ``getfattr -n user.depot.stats MOUNT``)."""
        return {
            **self.reader.stats,
            **{f"prefetch_on_open_{k}": v for k, v in self.client.prefetch_stats.items()},
            "blocks_held": self.cache.live,
            "block_size": self.cache.block_size,
            "inodes": len(self.table),
            "open_files": len(self.files),
        }

    # directories --------------------------------------------------------------------------------
    @fuse_errors
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        node = self._inode(inode)
        if not node.status.is_dir:
            raise FUSEError(errno.ENOTDIR)
        local = self._local_children(node.path)
        try:
            entries = await self.client.list(node.path)
        except NotFound:
            if not local and node.path not in self.pending_dirs:
                raise
            entries = []
        if local:
            names = {e.path.rstrip("/").rpartition("/")[2] for e in entries}
            entries += [e for e in local if e.path.rpartition("/")[2] not in names]
        fh = self._fh()
        self.dirs[fh] = _DirHandle(node, entries)
        return fh

    @fuse_errors
    async def readdir(self, fh: FileHandleT, start_id: int, token: ReaddirToken) -> None:
        handle = self.dirs.get(fh)
        if handle is None:
            raise FUSEError(errno.EBADF)
        node = handle.inode
        # Ids: 1 is ".", 2 is "..", 3 + i is entries[i]; the kernel passes back the last one seen.
        if start_id < 1:
            if not pyfuse3.readdir_reply(token, b".", self._attrs(node), 1):
                return
            start_id = 1
        if start_id < 2:
            parent = self.table.by_path(node.path.rpartition("/")[0] or "/") or node
            if not pyfuse3.readdir_reply(token, b"..", self._attrs(parent), 2):
                return
            start_id = 2
        entries = handle.entries
        for index in range(start_id - 2, len(entries)):
            status = entries[index]
            name = status.path.rstrip("/").rpartition("/")[2]
            if not name:
                continue
            child = self._record(join(node.path, name), status)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(child), index + 3):
                self.table.drop_if_unused(child)
                break
            child.lookups += 1  # readdirplus: the kernel now holds a reference to the entry

    async def releasedir(self, fh: FileHandleT) -> None:
        self.dirs.pop(fh, None)

    # files --------------------------------------------------------------------------------------
    @fuse_errors
    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext) -> FileInfo:
        node = self._inode(inode)
        if flags & _WRITE_FLAGS:
            return await self.open_for_write(node, flags)
        if node.staged is not None:  # being written on this mount: read what was written
            return self._open_writer(node, node.staged, writable=False)
        if not node.fresh(self.settings.attr_timeout):
            status = await self._stat(node.path)
            if status.is_dir != node.status.is_dir:
                raise FUSEError(errno.ENOENT)
            if self.table.update(node, status) is not None:
                self._changed(node)
        if node.status.is_dir:
            raise FUSEError(errno.EISDIR)
        version = node.version
        assert version is not None
        # The kernel keeps the pages it has for this inode only if they are of this version.
        keep = self.settings.kernel_cache and node.cached_version == version
        node.cached_version = version
        if node.data is None or node.data.version != version:
            if node.data is not None:
                node.data.close()
            node.data = FileData(self.cache, node, version, node.status.size)
        fh = self._fh()
        self.files[fh] = Handle(fh, node, version, node.status.size, node.data)
        node.opens += 1
        # Marked files (the mount's prefetch_on_open): the whole file into the cache, in the
        # background; reopens of the same version within a minute start nothing.
        self.client.prefetch_on_open(node.path, node.status)
        return FileInfo(fh=fh, keep_cache=keep, direct_io=False)

    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        handle = self.files.get(fh)
        if handle is None:
            return await self._read_staged(fh, off, size)
        try:
            reply: Reply = await self.reader.read(handle, off, size)
        except Exception as exc:
            code = errno_of(exc)
            log.warning(
                "read %s [%d, +%d) failed (%s): %s",
                handle.path,
                off,
                size,
                errno.errorcode.get(code, code),
                exc,
            )
            raise FUSEError(code) from None
        # pyfuse3 takes any buffer; a view of a pooled block is sent without a copy.
        return cast(bytes, reply)

    @fuse_errors
    async def flush(self, fh: FileHandleT) -> None:
        writer = self.writers.get(fh)
        if writer is not None and writer.writable:
            await self._upload(writer.inode, writer.staged)

    @fuse_errors
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        await self.flush(fh)
        writer = self.writers.get(fh)
        if self.settings.fsync == "store" and writer is not None and writer.writable:
            # -o fsync=store: a write-back upload is waited for (no deadline, like a hard
            # NFS mount: the bytes stay safe on the worker while the store is away).
            await self.client.sync(writer.inode.path, wait=True)

    async def release(self, fh: FileHandleT) -> None:
        handle = self.files.pop(fh, None)
        if handle is None:
            await self._release_writer(fh)
            return
        node = handle.inode
        node.opens -= 1
        gone = self.table.drop_if_unused(node)
        if gone is not None and gone.data is not None:
            gone.data.close()
            gone.data = None

    # writes (docs/fuse.md#writes) ---------------------------------------------------------------
    def _writable(self) -> None:
        if not self.writable:
            raise FUSEError(errno.EROFS)

    def _child(self, parent_inode: int, name: bytes) -> str:
        parent = self._inode(parent_inode)
        if not parent.status.is_dir:
            raise FUSEError(errno.ENOTDIR)
        return join(parent.path, os.fsdecode(name))

    def _local_children(self, path: str) -> list[FileStatus]:
        """Entries of ``path`` only this mount knows: empty directories made here, files being
        written that the store does not list yet."""
        prefix = "/" if path == "/" else path + "/"
        found = [
            FileStatus(path=p, size=0, mtime=0.0, is_dir=True)
            for p in self.pending_dirs
            if p.startswith(prefix) and "/" not in p[len(prefix) :]
        ]
        for inode in self.writing.values():
            staged = inode.staged
            p = inode.path
            inside = p.startswith(prefix) and "/" not in p[len(prefix) :]
            if staged is not None and not staged.unlinked and inside:
                found.append(FileStatus(path=p, size=staged.size, mtime=staged.mtime))
        return found

    def _has_local_descendants(self, path: str) -> bool:
        prefix = path + "/"
        return any(p.startswith(prefix) for p in self.pending_dirs) or any(
            i.path.startswith(prefix) and i.staged is not None and not i.staged.unlinked
            for i in self.writing.values()
        )

    async def _check_writable(self, path: str) -> None:
        """``ReadOnly`` (EROFS) now rather than at close when the path's mount refuses writes;
        ``AlreadyExists`` when a file is there (the worker's mkdir check, which creates nothing)."""
        await self.client.mkdir(path)

    async def _stage(self, node: Inode, *, local: bool) -> tuple[Staged, bool]:
        """The spool of ``node``: a new one (True), or the one another open made meanwhile.

        A new or truncated file whose owner worker is on this node, on a write-back mount,
        is spooled in a staging file the worker lends (a local write, docs/writes.md): the
        upload at close is then a commit, with no second copy of the bytes."""
        slot = None
        if local:
            try:
                slot = await self.client.local_slot(node.path)
            except DepotError as exc:  # the upload at close meets it again and answers it
                log.debug("no local write for %s: %s", node.path, exc)
        if node.staged is not None:
            if slot is not None:
                await slot.abort()
            return node.staged, False
        try:
            staged = Staged(
                node.path,
                self.staging_dir,
                base_size=node.status.size,
                local=local,
                slot=slot,
                direct_io=self.client.direct_io,
            )
        except OSError as exc:  # the lent file cannot be opened here after all
            log.info("spooling %s here instead of in the worker's file: %s", node.path, exc)
            if slot is not None:
                await slot.abort()
            staged = Staged(node.path, self.staging_dir, base_size=node.status.size, local=local)
        node.staged = staged
        self.writing[node.ino] = node
        return staged, True

    def _source(self, node: Inode) -> _StoredFile:
        return _StoredFile(self, node)

    def _open_writer(
        self,
        node: Inode,
        staged: Staged,
        *,
        append: bool = False,
        writable: bool = True,
        flags: int = 0,
    ) -> FileInfo:
        staged.handles += 1
        node.opens += 1
        fh = self._fh()
        self.writers[fh] = _WriteHandle(fh, node, staged, append=append, writable=writable)
        # No keep_cache: the kernel drops the pages it held of the old content. A write-only
        # handle (which cannot be read or mapped) skips the kernel's page cache: its writes
        # reach the spool with one copy less.
        write_only = (flags & os.O_ACCMODE) == os.O_WRONLY
        return FileInfo(fh=fh, keep_cache=False, direct_io=write_only)

    def _uploaded(self, node: Inode, status: FileStatus) -> None:
        """``node`` has new content in the store: record it, drop every cached byte of the old.

        The next open asks the worker again rather than trusting this status for
        ``attr_timeout``: on a write-back mount it names a provisional version that the upload,
        when it lands, replaces (a reader pinned to it would then get ``ESTALE``)."""
        self.table.update(node, status)
        node.checked = 0.0
        if node.data is not None:
            node.data.close()
            node.data = None
        node.cached_version = None
        self._kernel_call(pyfuse3.invalidate_inode, node.ino)

    async def _upload(self, node: Inode, staged: Staged) -> None:
        async with staged.lock:
            if not staged.dirty or staged.unlinked:
                return
            staged.dirty = False
            try:
                status: FileStatus | None = None
                slot = staged.slot
                if slot is not None:  # a local write: the spool is the worker's staging file
                    checksum = await asyncio.to_thread(staged.finish_slot)
                    try:
                        status = await slot.commit(staged.size, checksum)
                    except NotFound:  # the worker dropped the slot (expired, restarted)
                        staged.slot = None
                    else:
                        staged.committed()
                if status is None:
                    await asyncio.to_thread(staged.file.seek, 0)
                    status = await self.client.write(node.path, staged.file)
            except BaseException:
                staged.dirty = True
                staged.failed = True
                raise
            log.debug("uploaded %s (%d bytes)", node.path, status.size)
            if not staged.unlinked:
                self._uploaded(node, status)

    async def _release_writer(self, fh: int) -> None:
        writer = self.writers.pop(fh, None)
        if writer is None:
            return
        node, staged = writer.inode, writer.staged
        staged.handles -= 1
        if staged.handles == 0:
            if staged.dirty and not staged.failed and not staged.unlinked:
                try:  # no flush came (it always does on close): upload, report in the log
                    await self._upload(node, staged)
                except Exception as exc:
                    log.warning("uploading %s on release failed: %s", node.path, exc)
            if staged.slot is not None:  # lent, never committed: nothing to acknowledge
                await staged.slot.abort()
                staged.slot = None
            staged.close()
            node.staged = None
            self.writing.pop(node.ino, None)
        node.opens -= 1
        gone = self.table.drop_if_unused(node)
        if gone is not None and gone.data is not None:
            gone.data.close()
            gone.data = None

    @fuse_errors
    async def _read_staged(self, fh: int, off: int, size: int) -> bytes:
        writer = self.writers.get(fh)
        if writer is None:
            raise FUSEError(errno.EBADF)
        return await writer.staged.read(off, size, self._source(writer.inode))

    async def _refresh_file(self, node: Inode) -> None:
        """Check that ``node`` may be written (``EROFS`` now, not at close) and record its
        current status: the size and version a spool starts from."""
        try:
            await self._check_writable(node.path)
        except AlreadyExists:
            pass
        status = await self._stat(node.path)
        if status.is_dir:
            raise FUSEError(errno.EISDIR)
        if self.table.update(node, status) is not None:
            self._changed(node)

    async def open_for_write(self, node: Inode, flags: int) -> FileInfo:
        self._writable()
        truncate = bool(flags & os.O_TRUNC)
        if node.staged is None:
            await self._refresh_file(node)
        staged = node.staged  # again: another open may have staged the file meanwhile
        if staged is None:
            staged, new = await self._stage(node, local=truncate)
            if new:
                return self._open_writer(
                    node, staged, append=bool(flags & os.O_APPEND), flags=flags
                )
        info = self._open_writer(node, staged, append=bool(flags & os.O_APPEND), flags=flags)
        if truncate:
            await self._truncate_open(info.fh, node, staged, 0)
        return info

    async def _truncate_open(self, fh: int, node: Inode, staged: Staged, size: int) -> None:
        """Truncate the shared spool for a new handle ``fh`` (it keeps the spool alive while
        the call waits); the handle is released again if that fails."""
        try:
            await staged.truncate(size, self._source(node))
        except BaseException:
            await self._release_writer(fh)
            raise

    @fuse_errors
    async def create(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, flags: FlagT, ctx: RequestContext
    ) -> tuple[FileInfo, EntryAttributes]:
        self._writable()
        path = self._child(parent_inode, name)
        truncate = bool(flags & os.O_TRUNC)
        exists = False
        try:
            await self._check_writable(path)
        except AlreadyExists:
            if flags & os.O_EXCL:
                raise
            exists = True  # the kernel did not know it yet (a negative entry): keep its bytes
        node = self.table.by_path(path)
        if exists and (node is None or node.staged is None):
            status = await self._stat(path)
            if status.is_dir:
                raise FUSEError(errno.EISDIR)
            node = self._record(path, status)
        elif node is None or node.status.is_dir:
            node = self._record(path, FileStatus(path=path, size=0, mtime=time.time()))
        staged, new = (
            (node.staged, False)
            if node.staged is not None
            else await self._stage(node, local=truncate or not exists)
        )
        info = self._open_writer(node, staged, append=bool(flags & os.O_APPEND), flags=flags)
        if not new and truncate:
            await self._truncate_open(info.fh, node, staged, 0)
        node.lookups += 1
        return info, self._attrs(node)

    @fuse_errors
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        writer = self.writers.get(fh)
        if writer is None or not writer.writable:
            raise FUSEError(errno.EBADF)
        offset = None if writer.append else off
        return await writer.staged.write(offset, buf, self._source(writer.inode))

    @fuse_errors
    async def setattr(
        self,
        inode: InodeT,
        attr: EntryAttributes,
        fields: SetattrFields,
        fh: FileHandleT | None,
        ctx: RequestContext,
    ) -> EntryAttributes:
        self._writable()
        node = self._inode(inode)
        if fields.update_size:
            if node.status.is_dir:
                raise FUSEError(errno.EISDIR)
            if node.staged is not None or attr.st_size != node.status.size:
                await self._truncate(node, attr.st_size)
        # Modes, owners and times are not stored by object stores: accepted and ignored.
        return self._attrs(node)

    async def _truncate(self, node: Inode, size: int) -> None:
        """``truncate``/``ftruncate``: of a file being written, its spool changes (uploaded on
        its close); of a file no one writes, it is staged as an open would, cut or extended,
        and uploaded by this call (whose errors are the call's). A handle taken for the time of
        the call keeps the spool alive should the writers close meanwhile."""
        if node.staged is None:
            await self._refresh_file(node)
        staged = node.staged  # again: another open may have staged the file meanwhile
        if staged is None:
            if size == node.status.size:
                return
            staged, _ = await self._stage(node, local=size == 0)
        info = self._open_writer(node, staged)
        try:
            if size != staged.size:
                await staged.truncate(size, self._source(node))
            writers = [w for w in self.writers.values() if w.staged is staged and w.writable]
            if len(writers) == 1:  # only this call's handle: no close uploads it later
                await self._upload(node, staged)
        finally:
            await self._release_writer(info.fh)

    @fuse_errors
    async def mknod(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int, ctx: RequestContext
    ) -> EntryAttributes:
        self._writable()
        if not stat.S_ISREG(mode):
            raise FUSEError(errno.EPERM)  # no devices, fifos or sockets in an object store
        path = self._child(parent_inode, name)
        status = await self.client.write(path, b"")
        node = self._record(path, status)
        node.lookups += 1
        return self._attrs(node)

    @fuse_errors
    async def mkdir(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, ctx: RequestContext
    ) -> EntryAttributes:
        self._writable()
        path = self._child(parent_inode, name)
        await self.client.mkdir(path)
        self.pending_dirs.add(path)
        node = self._record(path, FileStatus(path=path, size=0, mtime=time.time(), is_dir=True))
        node.lookups += 1
        return self._attrs(node)

    @fuse_errors
    async def rmdir(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        self._writable()
        path = self._child(parent_inode, name)
        try:
            entries = await self.client.list(path)
        except NotFound:
            entries = []
            if path not in self.pending_dirs:
                raise
        if entries or self._has_local_descendants(path):
            raise FUSEError(errno.ENOTEMPTY)
        if path in self.pending_dirs:
            self.pending_dirs.discard(path)
        else:  # an empty directory the store keeps (a local directory): remove it if it can
            try:
                await self.client.delete(path)
            except (NotFound, IsADirectory):
                pass
        node = self.table.by_path(path)
        if node is not None:
            self.table.unlink(node)

    @fuse_errors
    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        self._writable()
        path = self._child(parent_inode, name)
        node = self.table.by_path(path)
        staged = node.staged if node is not None else None
        try:
            await self.client.delete(path)
        except NotFound:
            if staged is None:
                raise
        if staged is not None:
            staged.unlinked = True
        if node is not None:
            self.table.unlink(node)

    @fuse_errors
    async def rename(
        self,
        parent_inode_old: InodeT,
        name_old: FileNameT,
        parent_inode_new: InodeT,
        name_new: FileNameT,
        flags: FlagT,
        ctx: RequestContext,
    ) -> None:
        self._writable()
        src = self._child(parent_inode_old, name_old)
        dst = self._child(parent_inode_new, name_new)
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            raise FUSEError(errno.EOPNOTSUPP)  # RENAME_EXCHANGE: no atomic swap in a store
        node = self.table.by_path(src)
        if node is None:
            node = self._record(src, await self._stat(src))
        if flags & pyfuse3.RENAME_NOREPLACE and self.table.by_path(dst) is not None:
            raise FUSEError(errno.EEXIST)
        if node.status.is_dir:
            empty_here = src in self.pending_dirs and not self._has_local_descendants(src)
            if not empty_here or await self._lists_entries(src):
                raise FUSEError(errno.EOPNOTSUPP)  # directory renames: not in object stores
            self.pending_dirs.discard(src)
            self.pending_dirs.add(dst)
            self.table.move(node, dst)
            return
        staged = node.staged
        status: FileStatus | None
        try:
            status = await self.client.rename(src, dst)
        except NotFound:
            if staged is None:
                raise
            status = None  # not uploaded yet: the upload on close goes to the new name
        replaced = self.table.by_path(dst)
        if replaced is not None and replaced is not node:
            if replaced.staged is not None:
                replaced.staged.unlinked = True
            self.table.unlink(replaced)
        self.table.move(node, dst)
        if staged is not None:
            staged.path = dst
        if status is not None:
            self._uploaded(node, status)

    async def _lists_entries(self, path: str) -> bool:
        try:
            return bool(await self.client.list(path))
        except NotFound:
            return False

    async def link(
        self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        self._writable()
        raise FUSEError(errno.EPERM)  # hard links do not exist in object stores

    async def symlink(
        self, parent_inode: InodeT, name: FileNameT, target: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        self._writable()
        raise FUSEError(errno.EPERM)  # nor do symbolic links

    async def setxattr(
        self, inode: InodeT, name: XAttrNameT, value: bytes, ctx: RequestContext
    ) -> None:
        self._writable()
        raise FUSEError(errno.EOPNOTSUPP)

    async def removexattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> None:
        self._writable()
        raise FUSEError(errno.EOPNOTSUPP)


__all__ = ["DepotOperations", "fuse_errors"]
