"""The page store on local disks: one file per page, verified reads, quota, eviction, recovery.

Layout of each cache dir::

    <dir>/.lock                       flock'ed while a store has the dir open
    <dir>/depot-pagestore.json        format version and page size of the pages below
    <dir>/pages/<shard>/<file>/<index>          one page (see ``depot.pagestore.format``)
    <dir>/pages/<shard>/<file>/.<index>.*.tmp   a page being written

Durability: pages are written to a temp file and renamed into place, never fsync'ed. This is a
cache; after a power loss a page may be torn or empty, and the per-block checksums catch that on
the next read (or the footer check catches it at recovery), so a damaged page is dropped and
fetched again instead of being served.

Concurrency: every index change happens on the event loop; threads only do file I/O. A read
first tries ``preadv(RWF_NOWAIT)`` inline, which succeeds only when the bytes are in the page
cache, and falls back to the store's thread pool when it would block. Writes and unlinks always
go to the pool. Space is reserved before a write starts, and the bytes of evicted pages stay
counted until their files are unlinked, so the bytes on disk never exceed the quota. Disk
operations on one page (write, unlink) are serialized by a per-page pending future.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import itertools
import json
import logging
import mmap
import os
import shutil
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from depot.core.config import DEFAULT_PAGE_SIZE, CacheConfig
from depot.core.errors import ConfigError, DepotError, InvalidArgument, InvalidRange, Unavailable
from depot.core.types import PageId
from depot.pagestore import format as fmt
from depot.pagestore.base import Buffer, PageStore, PageStoreStats
from depot.pagestore.direct import META_NAME, PAGES_DIR
from depot.pagestore.direct import CorruptPage as _CorruptPage
from depot.pagestore.direct import read_blocks as _read_blocks
from depot.pagestore.eviction import make_policy

log = logging.getLogger(__name__)

T = TypeVar("T")

BLOCK_SIZE = fmt.BLOCK_SIZE
LOCK_NAME = ".lock"

_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
#: Offsets, lengths and buffer addresses of direct writes are multiples of this.
DIRECT_ALIGN = 4096
#: The aligned buffer of each I/O thread that direct writes go through (a multiple of it).
DIRECT_BUFFER = 8 * 1024 * 1024
_MEDIA_ERRORS = frozenset({errno.EIO, errno.ENODATA, getattr(errno, "EUCLEAN", 117)})


@dataclass(eq=False, slots=True)
class _Entry:
    """One committed page. ``fd``/``sums`` are caches, owned by the event loop."""

    page: PageId
    dir: _Dir
    length: int
    disk_size: int
    path: str
    sums: array[int] | None = None
    fd: int = -1
    readers: int = 0
    dead: bool = False
    # Its verified bytes while the memory tier holds them (never changed once set), and its
    # uses since it was held (halved now and then).
    held: Buffer | None = None
    uses: int = 0


@dataclass(eq=False, slots=True)
class _Dir:
    """A cache dir and its accounting: ``used`` (committed pages), ``reserved`` (writes in
    flight) and ``dying`` (evicted or deleted pages whose files are not unlinked yet)."""

    root: Path
    capacity: int
    pages_root: Path = field(init=False)
    used: int = 0
    reserved: int = 0
    dying: int = 0
    count: int = 0
    lock_fd: int = -1
    direct: bool = _O_DIRECT != 0  # False once the filesystem refused O_DIRECT (tmpfs)

    def __post_init__(self) -> None:
        self.pages_root = self.root / PAGES_DIR

    @property
    def free(self) -> int:
        return self.capacity - self.used - self.reserved - self.dying


@dataclass(frozen=True, slots=True)
class DirStats:
    """Usage of one cache dir (``used_bytes`` includes writes and unlinks in flight)."""

    path: Path
    capacity_bytes: int
    used_bytes: int
    pages: int


@dataclass(slots=True)
class _Found:
    """A valid page file found by the recovery scan."""

    page: PageId
    length: int
    disk_size: int
    path: str
    stamp: float
    sums: array[int]


@dataclass(slots=True)
class _ScanResult:
    found: list[_Found] = field(default_factory=list)
    invalid: int = 0
    removed: int = 0


class LocalPageStore(PageStore):
    """Pages as files on one or more local dirs, each with its own size.

    Create it, then ``await store.start()`` (or use ``await LocalPageStore.open(...)``, or
    ``async with``) before use: ``start`` takes the dir locks and rebuilds the index from the
    files on disk. ``close`` waits for writes in flight and releases everything.

    Usage is counted in bytes on disk (page data plus its small trailer, ~0.02%), so a quota of
    exactly N full pages holds N - 1 of them. A page goes to the dir with the most free space;
    recovery scans every dir, so where a page went does not need to be remembered.

    Tuning: ``io_threads`` serve writes, unlinks and reads that would block; ``fd_cache`` keeps
    that many page files open (it saves an open/close, about 40% of a cached 4 KiB read);
    ``checksum_cache_bytes`` bounds the checksum tables kept in memory (8 bytes per 64 KiB of
    pages); reads longer than ``inline_read_max`` (default: a page) always go to a thread.
    ``inline_reads``/``thread_reads`` count which path reads took.

    ``memory_bytes`` is the memory tier: pages read whole from their files (and so checked)
    are held in memory, up to that many bytes, so that the next read of a hot page costs
    neither a read of its file nor its checksums. A page goes in on a read after its first
    use, never on its first: a file read once (a cold read, whose pages the worker's
    read-ahead stored just before) costs no new memory. When the tier is full, a page goes in
    only if it was used more often than the least recently used page it would push out (uses
    counted for held pages and, for the ones not held, in a bounded record; all counts halve
    now and then): a file larger than the tier, read again and again, then leaves the same part of it
    in memory, where plain LRU would replace every page before its next use. A page leaves the
    tier with its file (evicted, deleted, replaced, found damaged): the tier holds a subset of
    the stored pages, never a page the store no longer has.
    """

    def __init__(
        self,
        dirs: list[tuple[Path, int]],
        page_size: int = DEFAULT_PAGE_SIZE,
        eviction: str = "lru",
        *,
        io_threads: int = 8,
        fd_cache: int = 128,
        checksum_cache_bytes: int = 16 * 1024 * 1024,
        inline_read_max: int | None = None,
        memory_bytes: int = 0,
    ) -> None:
        if not dirs:
            raise InvalidArgument("a page store needs at least one dir")
        if page_size <= 0:
            raise InvalidArgument(f"page size must be positive, not {page_size}")
        roots: set[Path] = set()
        self._dirs: list[_Dir] = []
        for path, size in dirs:
            if size <= 0:
                raise InvalidArgument(f"cache dir {path} needs a positive size, not {size}")
            root = Path(path).absolute()
            if root in roots:
                raise InvalidArgument(f"cache dir {root} is listed twice")
            roots.add(root)
            self._dirs.append(_Dir(root, size))
        self.page_size = page_size
        self._policy = make_policy(eviction)
        self._index: dict[PageId, _Entry] = {}
        self._by_file: dict[str, dict[int, _Entry]] = {}
        self._pending: dict[PageId, asyncio.Future[None]] = {}
        self._jobs: set[asyncio.Future[Any]] = set()
        self._space = asyncio.Event()
        self._fds: OrderedDict[PageId, _Entry] = OrderedDict()
        self._fd_cache = max(0, fd_cache)
        self._sums: OrderedDict[PageId, _Entry] = OrderedDict()
        self._sums_bytes = 0
        self._sums_budget = max(0, checksum_cache_bytes)
        # The memory tier: held entries, oldest use first (changed on the loop only).
        self._held: OrderedDict[PageId, _Entry] = OrderedDict()
        self._held_bytes = 0
        self._memory_capacity = max(0, memory_bytes)
        # Uses of pages not held, from a page's first use until it is held (bounded, oldest out
        # first: enough for a file 16 times the tier to be read twice), and what a page must
        # beat to go into a full tier: the least recently used held page's uses.
        self._seen: OrderedDict[PageId, int] = OrderedDict()
        self._seen_max = max(1024, 16 * self._memory_capacity // page_size)
        self._admit_over = 0
        self._uses_until_halving = _halving_period(self._memory_capacity, page_size)
        # Lanes count their hits from their own threads.
        self._memory_hits = 0
        self._memory_hits_lock = threading.Lock()
        self._inline_max = page_size if inline_read_max is None else inline_read_max
        self._nowait = _RWF_NOWAIT != 0
        self._scratch = memoryview(bytearray(2 * BLOCK_SIZE))
        self._direct_buffers = _ThreadBuffers(min(page_size, DIRECT_BUFFER))
        self._io_threads = max(1, io_threads)
        self._pool: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tmp_seq = itertools.count()
        self._started = False
        self._closed = False
        self._stats = PageStoreStats(capacity_bytes=sum(d.capacity for d in self._dirs))
        self.inline_reads = 0
        self.thread_reads = 0

    # ----------------------------------------------------------------- lifecycle

    @classmethod
    async def open(
        cls,
        dirs: list[tuple[Path, int]],
        page_size: int = DEFAULT_PAGE_SIZE,
        eviction: str = "lru",
        **options: Any,
    ) -> LocalPageStore:
        """Create a store and ``start`` it."""
        store = cls(dirs, page_size, eviction, **options)
        await store.start()
        return store

    @classmethod
    def from_config(cls, cache: CacheConfig, **options: Any) -> LocalPageStore:
        """A store for ``cache`` (not started yet)."""
        options.setdefault("memory_bytes", cache.memory_capacity)
        return cls(
            [(d.path, d.size) for d in cache.dirs], cache.page_size, cache.eviction, **options
        )

    @classmethod
    async def open_from_config(cls, cache: CacheConfig, **options: Any) -> LocalPageStore:
        """A started store for ``cache``."""
        store = cls.from_config(cache, **options)
        await store.start()
        return store

    @property
    def eviction(self) -> str:
        return self._policy.name

    @property
    def capacity(self) -> int:
        return self._stats.capacity_bytes

    async def start(self) -> None:
        """Lock the dirs and rebuild the index from the page files on disk.

        Temp files of interrupted writes are deleted, files that are not valid pages are
        deleted, and pages over a dir's size (after the size was lowered) are evicted, oldest
        first. The eviction order starts from the files' access and modification times.
        """
        if self._started:
            return
        if self._closed or self._loop is not None:
            raise Unavailable("page store is closed or already starting")
        self._loop = asyncio.get_running_loop()
        self._pool = ThreadPoolExecutor(self._io_threads, thread_name_prefix="depot-pages")
        try:
            for d in self._dirs:
                await self._in_thread(self._prepare_dir, d)
            scans = await asyncio.gather(*(self._in_thread(self._scan_dir, d) for d in self._dirs))
            self._load(list(zip(self._dirs, scans, strict=True)))
            await self._trim_to_capacity()
        except BaseException:
            await self.close()
            raise
        self._started = True
        stats = self.stats()
        log.info(
            "page store: %d pages, %d of %d bytes in %d dirs; removed %d stray files, "
            "dropped %d invalid pages, evicted %d over the quota",
            stats.pages,
            stats.used_bytes,
            stats.capacity_bytes,
            len(self._dirs),
            sum(s.removed for s in scans),
            stats.corrupt_dropped,
            stats.evictions,
        )

    async def close(self) -> None:
        """Wait for disk work in flight, close cached files and release the dir locks."""
        if self._closed:
            return
        self._closed = True
        self._space.set()  # writes waiting for room give up
        while self._jobs or self._pending:
            await asyncio.wait({*self._jobs, *self._pending.values()})
        for entry in list(self._index.values()):
            self._forget(entry)
        self._index.clear()
        self._by_file.clear()
        self._pending.clear()
        for d in self._dirs:
            if d.lock_fd >= 0:
                os.close(d.lock_fd)
                d.lock_fd = -1
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    async def drain(self) -> None:
        """Wait until the disk work started so far (background unlinks included) is done."""
        while self._jobs:
            await asyncio.wait(set(self._jobs))

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("page store is closed")
        if not self._started:
            raise Unavailable("page store is not started: await start() first")

    # ----------------------------------------------------------------- reads

    def page_length(self, page: PageId) -> int | None:
        entry = self._index.get(page)
        return None if entry is None else entry.length

    def file_pages(self, file_key: str) -> list[int]:
        return sorted(self._by_file.get(file_key, ()))

    def touch(self, page: PageId) -> bool:
        # A use of a page not stored (yet: a miss served as fetched) counts for the memory
        # tier too, whose pages go in on a read after their first use.
        self._note_use(page)
        if page not in self._index:
            return False
        self._policy.touch(page)
        return True

    def _note_use(self, page: PageId) -> None:
        """Count a use of ``page`` for the memory tier (on the loop)."""
        if not self._memory_capacity:
            return
        entry = self._held.get(page)
        if entry is not None:
            entry.uses += 1
            self._held.move_to_end(page)
        else:
            self._seen[page] = self._seen.pop(page, 0) + 1
            while len(self._seen) > self._seen_max:
                self._seen.popitem(last=False)
        self._uses_until_halving -= 1
        if self._uses_until_halving <= 0:
            self._uses_until_halving = _halving_period(self._memory_capacity, self.page_size)
            for held in self._held.values():
                held.uses //= 2
            # A page used once stays known at 0 uses (its next read is not its first).
            for key in self._seen:
                self._seen[key] //= 2
        self._set_admit_over()

    def _set_admit_over(self) -> None:
        """What a page must be used more than to go into the tier now (0: there is room)."""
        if self._held and self._held_bytes + self.page_size > self._memory_capacity:
            self._admit_over = next(iter(self._held.values())).uses
        else:
            self._admit_over = 0

    def held(self, page: PageId) -> Buffer | None:
        if not self._memory_capacity:
            return None
        entry = self._index.get(page)
        data = None if entry is None else entry.held
        if data is not None:
            self._count_memory_hit()
        return data

    def _count_memory_hit(self) -> None:
        with self._memory_hits_lock:
            self._memory_hits += 1

    def admission(self, page: PageId) -> Callable[[Buffer], bool] | None:
        entry = self._index.get(page)
        if entry is None or not self._may_hold(entry):
            return None
        return functools.partial(self._hold, entry)

    def _may_hold(self, entry: _Entry) -> bool:
        """Whether a whole read of ``entry``'s file now would be worth offering to the tier
        (any thread; ``_hold`` decides on the loop)."""
        if not self._memory_capacity or entry.held is not None:
            return False
        # This read is a use too (counted when the caller touches the page); it must not be
        # the page's first. Holding a page means new memory, which costs this VM as much as
        # filling the page file: a read-once file (a cold read) is not worth it.
        uses = self._seen.get(entry.page)
        return (
            uses is not None and entry.length <= self._memory_capacity
            and uses + 1 > self._admit_over
        )

    def _hold(self, entry: _Entry, data: Buffer) -> bool:
        """Hold ``data``, read whole from ``entry``'s file, if the entry is still the page's and
        it wins its place (see the class's text); the read's own use is counted by the caller."""
        if (
            entry.held is not None
            or self._index.get(entry.page) is not entry  # replaced or removed meanwhile
            or len(data) != entry.length
            or entry.length > self._memory_capacity
        ):
            return False
        uses = self._seen.get(entry.page, 0)
        need = self._held_bytes + entry.length - self._memory_capacity
        if need > 0:
            freed = 0
            for old in self._held.values():  # least recently used first
                if uses + 1 <= old.uses:
                    return False  # it would push out a page used at least as often
                freed += old.length
                if freed >= need:
                    break
            while self._held_bytes + entry.length > self._memory_capacity:
                _page, old = self._held.popitem(last=False)
                self._held_bytes -= old.length
                old.held = None
                self._seen[old.page] = old.uses
        self._seen.pop(entry.page, None)
        entry.held = data
        entry.uses = uses
        self._held[entry.page] = entry
        self._held_bytes += entry.length
        self._set_admit_over()
        return True

    def page_file(self, page: PageId) -> Path | None:
        """The file that holds ``page`` (for tools and tests), or None if absent."""
        entry = self._index.get(page)
        return None if entry is None else Path(entry.path)

    async def read_into(
        self, page: PageId, offset: int, out: memoryview, *, check_stored: bool = False
    ) -> bool:
        entry = self._index.get(page)
        if entry is None:
            return False
        if out.format != "B" or out.ndim != 1:
            out = out.cast("B")
        n = len(out)
        end = offset + n
        if offset < 0 or end > entry.length:
            raise InvalidRange(f"bytes [{offset}, {end}) outside page of {entry.length}", str(page))
        if n == 0:
            self._policy.touch(page)
            return True
        held = entry.held
        if held is not None and not check_stored:
            out[:] = memoryview(held)[offset:end]
            self._count_memory_hit()
            self.touch(page)
            return True
        whole = n == entry.length
        fd = self._acquire_fd(entry)
        if fd < 0:
            self._drop_corrupt(entry, "page file vanished")
            return False
        sums = entry.sums
        try:
            inline = False
            if self._nowait and n <= self._inline_max:
                try:
                    if sums is None:
                        sums = _load_sums(fd, entry, _RWF_NOWAIT)
                    _read_blocks(fd, entry.length, sums, offset, out, _RWF_NOWAIT, self._scratch)
                    inline = True
                except BlockingIOError:
                    pass  # not (all) in the page cache: read in a thread
                except OSError as exc:
                    if exc.errno != errno.EOPNOTSUPP:
                        raise
                    self._nowait = False  # no RWF_NOWAIT on this filesystem: always use threads
            if inline:
                self.inline_reads += 1
            else:
                sums = await self._in_thread(_read_slow, fd, entry, sums, offset, out)
                self.thread_reads += 1
        except _CorruptPage as exc:
            self._drop_corrupt(entry, str(exc))
            return False
        except OSError as exc:
            if exc.errno not in _MEDIA_ERRORS:
                raise
            self._drop_corrupt(entry, f"read error: {exc}")
            return False
        finally:
            self._release_fd(entry)
        if not entry.dead:
            self._remember_sums(entry, sums)
            self._policy.touch(page)
            if whole and self._may_hold(entry):
                self._hold(entry, bytes(out))
            self._note_use(page)
        return True

    def _acquire_fd(self, entry: _Entry) -> int:
        """An open fd for ``entry``'s file, pinned until ``_release_fd``; -1 if it is gone."""
        if entry.fd < 0:
            try:
                entry.fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return -1
            if self._fd_cache:
                self._fds[entry.page] = entry
                while len(self._fds) > self._fd_cache:
                    _page, old = self._fds.popitem(last=False)
                    if old.readers == 0:
                        self._close_fd(old)
        elif self._fd_cache:
            self._fds.move_to_end(entry.page)
        entry.readers += 1
        return entry.fd

    def _release_fd(self, entry: _Entry) -> None:
        entry.readers -= 1
        if entry.readers == 0 and (entry.dead or entry.page not in self._fds):
            self._close_fd(entry)

    @staticmethod
    def _close_fd(entry: _Entry) -> None:
        if entry.fd >= 0:
            os.close(entry.fd)
            entry.fd = -1

    def _remember_sums(self, entry: _Entry, sums: array[int] | None) -> None:
        if sums is None or self._sums_budget == 0:
            return
        if entry.sums is sums:
            self._sums.move_to_end(entry.page)
            return
        entry.sums = sums
        self._sums[entry.page] = entry
        self._sums_bytes += 8 * len(sums)
        while self._sums_bytes > self._sums_budget and self._sums:
            _page, old = self._sums.popitem(last=False)
            if old.sums is not None:
                self._sums_bytes -= 8 * len(old.sums)
                old.sums = None

    def _drop_corrupt(self, entry: _Entry, why: str) -> None:
        if self._index.get(entry.page) is not entry:
            return  # already replaced or removed while we were reading
        log.warning("dropping page %s in %s: %s", entry.page, entry.dir.root, why)
        self._stats.corrupt_dropped += 1
        self._spawn_unlink([self._detach(entry)])

    # ----------------------------------------------------------------- writes

    async def put(self, page: PageId, data: Buffer, *, bypass_os_cache: bool = False) -> bool:
        self._check_open()
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        size = len(view)
        if size > self.page_size:
            raise InvalidArgument(f"page of {size} bytes exceeds the page size {self.page_size}")
        where = fmt.page_path(page)
        need = fmt.file_size(size)
        if need > max(d.capacity for d in self._dirs):
            self._stats.rejected += 1
            return False
        lock = await self._lock([page])
        victims: list[_Entry] = []
        try:
            old = self._index.get(page)
            if old is not None:
                victims.append(self._detach(old))
            target, own = await self._reserve(need, victims, lock)
            file_dir = str(target.pages_root / where.shard / where.file_dir)
            path = os.path.join(file_dir, where.name)
            tmp = os.path.join(
                file_dir, f".{where.name}.{os.getpid()}.{next(self._tmp_seq)}{fmt.TEMP_SUFFIX}"
            )
            unlink = [v.path for v in victims]
            rmdirs = self._empty_file_dirs(victims, keep=file_dir)
            batch, victims = victims, []
            direct = self._direct_buffers if bypass_os_cache and target.direct else None
            try:
                (sums, direct_bytes), cancelled = await self._run(
                    _write_page, unlink, rmdirs, page, view, tmp, path, direct
                )
            except DepotError:
                raise
            except OSError as exc:
                log.warning("could not write page %s: %s", page, exc)
                self._stats.write_errors += 1
                return False
            finally:
                self._release(batch, target, own)
            if direct is not None:
                if direct_bytes < 0:
                    target.direct = False
                    log.info("cache dir %s takes no direct writes: preloads fill the OS "
                             "page cache", target.root)
                else:
                    self._stats.direct_bytes += direct_bytes
            entry = _Entry(page, target, size, need, path)
            self._attach(entry)
            self._remember_sums(entry, sums)
            if cancelled:
                raise asyncio.CancelledError
            return True
        finally:
            if victims:  # interrupted before the write job took them over
                self._spawn_unlink(victims)
            self._unlock(lock)

    async def _reserve(
        self, need: int, victims: list[_Entry], lock: asyncio.Future[None]
    ) -> tuple[_Dir, int]:
        """Pick a dir for ``need`` bytes, evicting as needed; returns (dir, bytes reserved).

        Evicted pages join ``victims``; their bytes stay counted (as ``dying``) until the write
        job unlinks them, and count towards this write's room in their dir. When the room is
        held by other writes in flight, waits for one of them to finish, after unlinking its
        own victims first, so that waiting writes never hold space that another one needs.
        """
        while True:
            if self._closed:
                raise Unavailable("page store is closed")
            mine: dict[int, int] = {}
            for v in victims:
                mine[id(v.dir)] = mine.get(id(v.dir), 0) + v.disk_size
            best: _Dir | None = None
            best_room = -1
            for d in self._dirs:
                room = d.free + mine.get(id(d), 0)
                if room >= need and room > best_room:
                    best, best_room = d, room
            if best is not None:
                own = max(0, need - mine.get(id(best), 0))
                best.reserved += own
                return best, own
            feasible = any(
                d.capacity - d.reserved - (d.dying - mine.get(id(d), 0)) >= need for d in self._dirs
            )
            victim = self._policy.victim() if feasible else None
            if victim is not None:
                entry = self._index[victim]
                self._stats.evictions += 1
                self._stats.evicted_bytes += entry.disk_size
                victims.append(self._detach(entry, evicted=True))
                self._pending[victim] = lock
                continue
            if victims:
                batch = victims[:]
                victims.clear()
                try:
                    await self._in_thread(
                        _unlink_all, [v.path for v in batch], self._empty_file_dirs(batch)
                    )
                finally:
                    self._release(batch, None, 0)
                    for v in batch:
                        if self._pending.get(v.page) is lock:
                            del self._pending[v.page]
                continue
            self._space.clear()
            await self._space.wait()

    def _release(self, gone: list[_Entry], target: _Dir | None, own: int) -> None:
        """Give back the bytes of unlinked entries and of a finished write's reservation."""
        for e in gone:
            e.dir.dying -= e.disk_size
        if target is not None:
            target.reserved -= own
        self._space.set()

    # ----------------------------------------------------------------- deletes

    async def delete(self, page: PageId) -> bool:
        self._check_open()
        lock = await self._lock([page])
        try:
            entry = self._index.get(page)
            if entry is None:
                return False
            await self._unlink([self._detach(entry)])
            return True
        finally:
            self._unlock(lock)

    async def delete_file(self, file_key: str) -> int:
        self._check_open()
        while True:
            busy = {f for p, f in self._pending.items() if p.file_key == file_key}
            if not busy:
                break
            await asyncio.wait(busy)
        entries = list(self._by_file.get(file_key, {}).values())
        if not entries:
            return 0
        lock = self._new_lock([e.page for e in entries])
        try:
            await self._unlink([self._detach(e) for e in entries])
        finally:
            self._unlock(lock)
        return len(entries)

    async def _unlink(self, entries: list[_Entry]) -> None:
        try:
            await self._in_thread(
                _unlink_all, [e.path for e in entries], self._empty_file_dirs(entries)
            )
        finally:
            self._release(entries, None, 0)

    def _spawn_unlink(self, entries: list[_Entry]) -> None:
        """Unlink detached entries in the background, for callers that cannot wait."""
        if self._pool is None or self._loop is None:
            self._release(entries, None, 0)
            return
        lock = self._new_lock([e.page for e in entries])
        job = self._loop.run_in_executor(
            self._pool, _unlink_all, [e.path for e in entries], self._empty_file_dirs(entries)
        )
        self._jobs.add(job)

        def done(fut: asyncio.Future[Any]) -> None:
            self._jobs.discard(fut)
            self._release(entries, None, 0)
            self._unlock(lock)
            if not fut.cancelled() and fut.exception() is not None:
                log.warning("could not unlink pages: %s", fut.exception())

        job.add_done_callback(done)

    def _empty_file_dirs(self, entries: Iterable[_Entry], keep: str | None = None) -> list[str]:
        """File dirs that hold no page once ``entries`` are gone (removed best-effort)."""
        out: set[str] = set()
        for e in entries:
            parent = os.path.dirname(e.path)
            if parent != keep and e.page.file_key not in self._by_file:
                out.add(parent)
        return sorted(out)

    # ----------------------------------------------------------------- index

    def _attach(self, entry: _Entry) -> None:
        self._index[entry.page] = entry
        self._by_file.setdefault(entry.page.file_key, {})[entry.page.index] = entry
        entry.dir.used += entry.disk_size
        entry.dir.count += 1
        self._policy.add(entry.page)
        self._space.set()

    def _detach(self, entry: _Entry, evicted: bool = False) -> _Entry:
        """Take ``entry`` out of the index; its bytes stay counted as dying until unlinked."""
        page = entry.page
        del self._index[page]
        files = self._by_file[page.file_key]
        del files[page.index]
        if not files:
            del self._by_file[page.file_key]
        self._policy.remove(page, evicted=evicted)
        entry.dir.used -= entry.disk_size
        entry.dir.dying += entry.disk_size
        entry.dir.count -= 1
        self._forget(entry)
        return entry

    def _forget(self, entry: _Entry) -> None:
        """Drop the caches held for ``entry`` (its fd closes once no read uses it)."""
        entry.dead = True
        self._fds.pop(entry.page, None)
        if entry.readers == 0:
            self._close_fd(entry)
        if self._sums.pop(entry.page, None) is not None and entry.sums is not None:
            self._sums_bytes -= 8 * len(entry.sums)
        entry.sums = None
        if entry.held is not None:
            if self._held.get(entry.page) is entry:
                del self._held[entry.page]
            self._held_bytes -= entry.length
            entry.held = None
            self._set_admit_over()
        self._seen.pop(entry.page, None)

    # ----------------------------------------------------------------- per-page ordering

    async def _lock(self, pages: list[PageId]) -> asyncio.Future[None]:
        """Wait until no disk operation on ``pages`` is in flight, then claim them."""
        while True:
            busy = {self._pending[p] for p in pages if p in self._pending}
            if not busy:
                return self._new_lock(pages)
            await asyncio.wait(busy)

    def _new_lock(self, pages: list[PageId]) -> asyncio.Future[None]:
        loop = self._loop or asyncio.get_running_loop()
        lock: asyncio.Future[None] = loop.create_future()
        for p in pages:
            self._pending[p] = lock
        return lock

    def _unlock(self, lock: asyncio.Future[None]) -> None:
        """Release every page claimed by ``lock`` (its own pages and its victims)."""
        for p in [p for p, f in self._pending.items() if f is lock]:
            del self._pending[p]
        if not lock.done():
            lock.set_result(None)

    # ----------------------------------------------------------------- threads

    async def _run(self, fn: Callable[..., T], *args: Any) -> tuple[T, bool]:
        """Run ``fn`` in the pool to the end even if the caller is cancelled meanwhile.

        Returns the result and whether a cancellation arrived; the caller finishes its
        bookkeeping and then raises ``CancelledError``. The job may be filling the caller's
        buffer or writing a page the index must learn about, so it is never abandoned.
        """
        if self._pool is None or self._loop is None:
            raise Unavailable("page store is closed")
        job = self._loop.run_in_executor(self._pool, fn, *args)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        cancelled = False
        while True:
            try:
                return await asyncio.shield(job), cancelled
            except asyncio.CancelledError:
                if job.cancelled():
                    raise
                if job.done():
                    return job.result(), True
                cancelled = True

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``_run``, raising ``CancelledError`` after the job if the caller was cancelled."""
        result, cancelled = await self._run(fn, *args)
        if cancelled:
            raise asyncio.CancelledError
        return result

    # ----------------------------------------------------------------- recovery

    def _prepare_dir(self, d: _Dir) -> None:
        """Create and lock the dir; wipe its pages if they were written for another format."""
        d.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(d.root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError("cache dir is in use by another page store", str(d.root)) from None
        d.lock_fd = fd
        want = {"format": fmt.FORMAT_VERSION, "page_size": self.page_size, "block_size": BLOCK_SIZE}
        meta_path = d.root / META_NAME
        try:
            have = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            have = None
        if have == want:
            d.pages_root.mkdir(exist_ok=True)
            return
        if d.pages_root.exists():
            log.warning(
                "cache dir %s holds pages of another format or page size (%s); discarding them",
                d.root,
                have,
            )
            trash = d.root / f"{PAGES_DIR}.discard-{os.getpid()}"
            os.replace(d.pages_root, trash)
            shutil.rmtree(trash, ignore_errors=True)
        d.pages_root.mkdir(exist_ok=True)
        tmp = d.root / f".{META_NAME}.tmp"
        tmp.write_text(json.dumps(want))
        os.replace(tmp, meta_path)

    def _scan_dir(self, d: _Dir) -> _ScanResult:
        """Find the valid pages under one dir, deleting temp files and anything unknown."""
        result = _ScanResult()
        for shard in _scandir(d.pages_root):
            if not shard.is_dir(follow_symlinks=False) or not _is_shard(shard.name):
                result.removed += _remove_any(shard.path)
                continue
            for fdir in _scandir(shard.path):
                key = fmt.file_key_of(fdir.name) if fdir.is_dir(follow_symlinks=False) else None
                if key is None or fmt.shard_of(key) != shard.name:
                    result.removed += _remove_any(fdir.path)
                    continue
                kept = 0
                for f in _scandir(fdir.path):
                    kept += self._scan_file(key, f, result)
                if not kept:
                    _rmdir(fdir.path)
        return result

    def _scan_file(self, key: str, f: os.DirEntry[str], result: _ScanResult) -> int:
        index = fmt.parse_index(f.name)
        if index is None or not f.is_file(follow_symlinks=False):
            result.removed += _remove_any(f.path)
            return 0
        page = PageId(key, index)
        try:
            st = f.stat(follow_symlinks=False)
            length, sums = _read_trailer(f.path, page, st.st_size, self.page_size)
        except (fmt.PageFormatError, OSError) as exc:
            log.warning("dropping invalid page file %s: %s", f.path, exc)
            result.invalid += 1
            result.removed += _remove_any(f.path)
            return 0
        stamp = max(st.st_atime, st.st_mtime)
        result.found.append(_Found(page, length, st.st_size, f.path, stamp, sums))
        return 1

    def _load(self, scans: list[tuple[_Dir, _ScanResult]]) -> None:
        found: list[tuple[_Dir, _Found]] = []
        for d, scan in scans:
            self._stats.corrupt_dropped += scan.invalid
            found.extend((d, f) for f in scan.found)
        found.sort(key=lambda item: item[1].stamp)
        duplicates: list[_Entry] = []
        for d, f in found:
            entry = _Entry(f.page, d, f.length, f.disk_size, f.path)
            old = self._index.get(f.page)
            if old is not None:  # the same page in two dirs: keep the newer one
                duplicates.append(self._detach(old))
            self._attach(entry)
            self._remember_sums(entry, f.sums)
        if duplicates:
            self._spawn_unlink(duplicates)

    async def _trim_to_capacity(self) -> None:
        """Evict the oldest pages of any dir that holds more than its size (it was lowered)."""
        victims: list[_Entry] = []
        for d in self._dirs:
            if d.used <= d.capacity:
                continue
            # The index was filled oldest first, so its order is the eviction order here.
            for e in [e for e in self._index.values() if e.dir is d]:
                if d.used <= d.capacity:
                    break
                self._stats.evictions += 1
                self._stats.evicted_bytes += e.disk_size
                victims.append(self._detach(e, evicted=True))
        if victims:
            await self._unlink(victims)

    # ----------------------------------------------------------------- stats

    def stats(self) -> PageStoreStats:
        s = self._stats
        return PageStoreStats(
            pages=len(self._index),
            used_bytes=sum(d.used + d.reserved + d.dying for d in self._dirs),
            capacity_bytes=s.capacity_bytes,
            evictions=s.evictions,
            evicted_bytes=s.evicted_bytes,
            corrupt_dropped=s.corrupt_dropped,
            rejected=s.rejected,
            write_errors=s.write_errors,
            direct_bytes=s.direct_bytes,
            memory_pages=len(self._held),
            memory_bytes=self._held_bytes,
            memory_capacity_bytes=self._memory_capacity,
            memory_hits=self._memory_hits,
        )

    def dir_stats(self) -> list[DirStats]:
        return [
            DirStats(d.root, d.capacity, d.used + d.reserved + d.dying, d.count) for d in self._dirs
        ]


def _halving_period(memory_capacity: int, page_size: int) -> int:
    """Uses counted between two halvings of the memory tier's counts: eight per page it holds."""
    return 8 * max(16, memory_capacity // max(1, page_size))


# --------------------------------------------------------------------- thread-side helpers


def _load_sums(fd: int, entry: _Entry, flags: int) -> array[int]:
    """Read and check the checksum table and footer of ``entry``'s file."""
    tail_len = entry.disk_size - entry.length
    tail = bytearray(tail_len)
    got = os.preadv(fd, [tail], entry.length, flags)
    if got != tail_len:
        if flags and got >= 0:
            raise BlockingIOError(errno.EAGAIN, "trailer not cached")
        raise _CorruptPage("page file truncated")
    try:
        length, sums = fmt.decode_trailer(entry.page, tail, entry.disk_size)
    except fmt.PageFormatError as exc:
        raise _CorruptPage(str(exc)) from None
    if length != entry.length:
        raise _CorruptPage("page length changed on disk")
    return sums


def _read_slow(
    fd: int, entry: _Entry, sums: array[int] | None, offset: int, out: memoryview
) -> array[int]:
    """The blocking read path (in a pool thread): load the checksums if needed, then read."""
    if sums is None:
        sums = _load_sums(fd, entry, 0)
    _read_blocks(fd, entry.length, sums, offset, out, 0, memoryview(bytearray(2 * BLOCK_SIZE)))
    return sums


class _ThreadBuffers(threading.local):
    """One aligned buffer per I/O thread for direct writes: touched once, reused."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.buffer: mmap.mmap | None = None

    def get(self) -> mmap.mmap:
        if self.buffer is None:
            self.buffer = mmap.mmap(-1, self.size)
        return self.buffer


def _write_page(
    unlink: list[str],
    rmdirs: list[str],
    page: PageId,
    data: memoryview,
    tmp: str,
    path: str,
    direct: _ThreadBuffers | None = None,
) -> tuple[array[int], int]:
    """Unlink replaced/evicted files, then write ``data`` to ``tmp`` and rename it to ``path``.

    With ``direct`` buffers, the aligned part of the data is written with ``O_DIRECT`` from a
    reused buffer (the copy into it costs far less than filling fresh page-cache pages), the
    rest and the trailer through the page cache. Returns the block sums and the bytes written
    directly (-1: the filesystem refuses ``O_DIRECT``; the page was written through the cache).
    """
    _unlink_all(unlink, rmdirs)
    sums = fmt.block_sums(data)
    trailer = fmt.encode_trailer(page, len(data), sums)
    parent = os.path.dirname(tmp)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    direct_bytes = 0
    fd = -1
    for attempt in range(3):
        try:
            if direct is not None and direct_bytes == 0:
                try:
                    fd = os.open(tmp, flags | _O_DIRECT, 0o644)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    direct_bytes = -1  # no O_DIRECT here: the ordinary way below
            if fd < 0:
                fd = os.open(tmp, flags, 0o644)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
            os.makedirs(parent, exist_ok=True)  # a concurrent delete may remove an empty dir
    try:
        parts = [data, memoryview(trailer)]
        offset = 0
        if direct is not None and direct_bytes == 0:
            offset = _write_direct(fd, data, direct.get())
            direct_bytes = offset
            parts[0] = data[offset:]
        _write_all(fd, parts, offset)
    except BaseException:
        os.close(fd)
        _unlink_quiet(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    return sums, direct_bytes


def _write_direct(fd: int, data: memoryview, buffer: mmap.mmap) -> int:
    """Write the aligned head of ``data`` at offset 0 of ``fd`` (opened with ``O_DIRECT``),
    through ``buffer`` a piece at a time, then turn ``O_DIRECT`` off for the rest. Returns the
    bytes written."""
    aligned = len(data) - len(data) % DIRECT_ALIGN
    done = 0
    view = memoryview(buffer)
    try:
        while done < aligned:
            count = min(len(view), aligned - done)
            view[:count] = data[done : done + count]
            piece = 0
            while piece < count:
                written = os.pwrite(fd, view[piece:count], done + piece)
                if written <= 0 or written % DIRECT_ALIGN:
                    # A short direct write: the rest goes through the page cache.
                    return _end_direct(fd, done + piece + max(written, 0))
                piece += written
            done += count
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        view.release()
    return _end_direct(fd, done)


def _end_direct(fd: int, done: int) -> int:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~_O_DIRECT)
    return done


def _write_all(fd: int, parts: list[memoryview], offset: int = 0) -> None:
    while parts:
        written = os.pwritev(fd, parts, offset)
        offset += written
        while parts and written >= len(parts[0]):
            written -= len(parts[0])
            parts.pop(0)
        if parts and written:
            parts[0] = parts[0][written:]


def _unlink_all(paths: list[str], rmdirs: list[str]) -> None:
    for p in paths:
        _unlink_quiet(p)
    for d in rmdirs:
        _rmdir(d)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass  # not empty (a page arrived meanwhile) or already gone


def _read_trailer(path: str, page: PageId, size: int, page_size: int) -> tuple[int, array[int]]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        want = min(size, fmt.trailer_size_for(page_size))
        tail = os.pread(fd, want, size - want)
        try:
            length, sums = fmt.decode_trailer(page, tail, size)
        except fmt.TrailerTooShort as short:
            if short.needed > size:
                raise fmt.PageFormatError("file too short") from None
            tail = os.pread(fd, short.needed, size - short.needed)
            length, sums = fmt.decode_trailer(page, tail, size)
    finally:
        os.close(fd)
    if length > page_size:
        raise fmt.PageFormatError(f"page of {length} bytes is larger than the page size")
    return length, sums


def _scandir(path: str | Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except FileNotFoundError:
        return []


def _is_shard(name: str) -> bool:
    return len(name) == 2 and all(c in "0123456789abcdef" for c in name)


def _remove_any(path: str) -> int:
    """Delete a file, link or tree that does not belong in the pages dir; 1 if removed."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        return 0
    return 1
