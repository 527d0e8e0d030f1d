"""Read-through service: namespace → metadata (cached per policy) → pages (cached) → UFS.

This is the worker's core, independent of HTTP so that every front end (HTTP API, S3 gateway,
tests) drives the same logic. Its guarantees:

- a page is keyed by the file *version*, and a revalidation that finds a new version drops the
  old version's pages, so stale bytes are never served;
- bytes filled from the UFS are fetched with the version's ETag as a precondition, so a page can
  never hold bytes of another version;
- concurrent misses on one page share a single UFS read (single flight);
- a read streams pages in order while fetching the missing ones ahead in parallel;
- a read whose first page is not cached streams that page from the UFS: its bytes go out as
  they arrive (time to first byte: the store's, not a whole page's), while the page is still
  cached only once it is whole.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from depot.core.errors import (
    DepotError,
    IsADirectory,
    NotADirectory,
    NotFound,
    StaleVersion,
)
from depot.core.singleflight import SingleFlight
from depot.core.types import ByteRange, FileId, FileStatus, PageId
from depot.metastore import MetadataStore
from depot.namespace.mounts import Mount, MountTable, Resolved
from depot.namespace.paths import join_path, normalize_path
from depot.pagestore.base import PageStore
from depot.ufs.base import Buffer, UnderStore, file_status

log = logging.getLogger(__name__)

StoreFactory = Callable[[Mount], UnderStore]
# (object URI, namespace path) -> the status and bytes of a write-back write of this worker not
# uploaded yet (read-your-writes, worker/writes.py), or None.
StagedLookup = Callable[[str, str], "tuple[FileStatus, UnderStore] | None"]


@dataclass(slots=True)
class ReadStats:
    """Counters of the read path (pages and bytes by source)."""

    hits: int = 0
    misses: int = 0
    bytes_from_cache: int = 0
    bytes_from_ufs: int = 0
    ufs_reads: int = 0
    ufs_read_shared: int = 0
    stale_dropped_files: int = 0
    metadata_hits: int = 0
    metadata_misses: int = 0
    revalidations: int = 0
    ufs_inflight: int = 0
    ufs_inflight_peak: int = 0
    # UFS reads of a page streamed to its readers as it arrived (also counted in ufs_reads).
    ufs_streamed: int = 0
    loaded_pages: int = 0
    loaded_bytes: int = 0
    freed_pages: int = 0
    # Pages and bytes local clients read straight from the page files (reported by them, also
    # counted in hits and bytes_from_cache).
    short_circuit_hits: int = 0
    short_circuit_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        total = self.hits + self.misses
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_ratio": (self.hits / total) if total else 0.0,
            "bytes_from_cache": self.bytes_from_cache,
            "bytes_from_ufs": self.bytes_from_ufs,
            "ufs_reads": self.ufs_reads,
            "ufs_read_shared": self.ufs_read_shared,
            "ufs_streamed": self.ufs_streamed,
            "stale_dropped_files": self.stale_dropped_files,
            "ufs_inflight": self.ufs_inflight,
            "ufs_inflight_peak": self.ufs_inflight_peak,
            "loaded_pages": self.loaded_pages,
            "loaded_bytes": self.loaded_bytes,
            "freed_pages": self.freed_pages,
            "short_circuit_hits": self.short_circuit_hits,
            "short_circuit_bytes": self.short_circuit_bytes,
            "metadata": {
                "hits": self.metadata_hits,
                "misses": self.metadata_misses,
                "revalidations": self.revalidations,
            },
        }


@dataclass(slots=True)
class OpenedFile:
    """A file resolved for reading: its status and the identity its pages are keyed by."""

    resolved: Resolved
    status: FileStatus
    file_id: FileId
    store: UnderStore


@dataclass(slots=True)
class _Stream:
    """A file read in order: the read-ahead state the worker keeps for it (``_follow_stream``)."""

    opened: OpenedFile
    last: int  # the highest page asked for lately
    next: int  # the first page read-ahead has not yet looked at
    inflight: int = 0  # read-ahead fetches started and not yet ended


@dataclass(slots=True)
class PagePlan:
    """Which pages a read touches and which of them are cached right now."""

    pages: list[int]
    cached: int = 0

    @property
    def cache_state(self) -> str:
        if not self.pages or self.cached == len(self.pages):
            return "hit"
        return "miss" if self.cached == 0 else "partial"



class _Fill:
    """A page being streamed from the UFS: the bytes received so far, readable before the end.

    ``view[:received]`` is final (bytes of the pinned version, never rewritten); readers wait
    on ``changed()`` for more. The last bytes of the page are published only once the stream
    has ended, so a stream that runs past the page hands out nothing it should not. ``done`` is
    set when the fill is over: then either ``error`` is the fill's error or ``view`` is the
    whole page.
    """

    __slots__ = ("_event", "_written", "done", "error", "length", "received", "view")

    def __init__(self, length: int) -> None:
        self.length = length
        self.view: memoryview = memoryview(b"")
        self.received = 0  # published to readers
        self._written = 0
        self.done = False
        self.error: BaseException | None = None
        self._event = asyncio.Event()

    def add(self, chunk: Buffer) -> bool:
        """Append the next chunk; False if it runs past the page (nothing is kept of it)."""
        data = memoryview(chunk)
        if data.format != "B" or data.ndim != 1:
            data = data.cast("B")
        end = self._written + len(data)
        if end > self.length:
            return False
        if self._written == 0 and end == self.length:
            self.view = data  # the whole page at once: kept as it came, not copied
        else:
            if self._written == 0:
                self.view = memoryview(bytearray(self.length))
            self.view[self._written : end] = data
        self._written = end
        if end < self.length:
            self.received = end
            self._wake()
        return True

    def ended(self) -> Buffer:
        """The stream is over: publish the rest; the bytes received (short if it ended early)."""
        if self.received != self._written:
            self.received = self._written
            self._wake()
        return self.view[: self.received]

    def finish(self, data: Buffer | None, error: BaseException | None) -> None:
        if error is not None:
            self.error = error
        elif data is not None and self.received < self.length:
            view = memoryview(data)  # filled by another fetch of the page: the same bytes
            self.view = view if view.format == "B" and view.ndim == 1 else view.cast("B")
            self.received = len(self.view)
        self.done = True
        self._wake()

    def _wake(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def changed(self) -> None:
        """Wait until more bytes arrived or the fill is over."""
        await self._event.wait()

    async def whole(self) -> Buffer:
        """The whole page once the fill is over, or its error."""
        while not self.done:
            await self.changed()
        if self.error is not None:
            raise self.error
        return self.view


class ReadThroughService:
    """Serves stat, list and byte ranges of the namespace through the page store."""

    def __init__(
        self,
        mounts: MountTable,
        pages: PageStore,
        metadata: MetadataStore,
        store_factory: StoreFactory,
        *,
        ufs_concurrency: int = 64,
        read_window: int = 8,
        prefetch_pages: int = 32,
        segment_size: int = 0,
        load_bypass_os_cache: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.mounts = mounts
        self.pages = pages
        self.metadata = metadata
        self._store_factory = store_factory
        self._stores: dict[str, UnderStore] = {}
        self._clock = clock
        self._ufs_slots = asyncio.Semaphore(ufs_concurrency)
        # Load pages fetched or being stored (see _load_page).
        self._load_slots = asyncio.Semaphore(ufs_concurrency)
        self._read_window = max(1, read_window)
        self._prefetch_pages = max(0, prefetch_pages)
        # Read-ahead stays inside the placement segment: the next one belongs to another worker.
        self._segment_size = max(0, segment_size)
        self._page_flight: SingleFlight[Buffer] = SingleFlight()
        self._meta_flight: SingleFlight[FileStatus | None] = SingleFlight()
        self._list_flight: SingleFlight[list[FileStatus]] = SingleFlight()
        self._background: set[asyncio.Task[Any]] = set()
        self._closed = False
        # Pages fetched from the UFS but not yet in the page store: readers arriving in that
        # window take the bytes from here instead of fetching them again.
        self._filling: dict[PageId, Buffer] = {}
        # Pages being streamed from the UFS (see _maybe_stream): readers take the bytes that
        # have arrived instead of waiting for the whole page.
        self._partial: dict[PageId, _Fill] = {}
        self._fill_waiters: dict[PageId, asyncio.Event] = {}  # load jobs waiting on a fill
        # Pages a load is fetching: stored with ``bypass_os_cache`` (nobody reads them yet).
        self._loading: dict[PageId, int] = {}
        self._load_bypass = load_bypass_os_cache
        # file key -> its read-ahead state, in least-recently-used order (sequential detection)
        self._streams: dict[str, _Stream] = {}
        self.stats = ReadStats()
        # Write-back: staged writes are served before the metadata cache (set by the daemon).
        self.staged: StagedLookup | None = None
        # Entity tags a write-back write was served under before it landed -> the tag of the
        # object it became (same bytes): a reader pinned to the first keeps reading.
        self.landed: OrderedDict[str, str] = OrderedDict()

    # under stores ----------------------------------------------------------------------------
    def store_for(self, mount: Mount) -> UnderStore:
        store = self._stores.get(mount.path)
        if store is None:
            store = self._store_factory(mount)
            self._stores[mount.path] = store
        return store

    async def close(self) -> None:
        self._streams.clear()  # no read-ahead beyond the fetches under way
        # Background work started while waiting (a fetched page's store) is waited for too.
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        self._closed = True
        for store in self._stores.values():
            with contextlib.suppress(Exception):
                await store.close()
        self._stores.clear()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any] | None:
        if self._closed:
            # The stores are closed: a page not stored now is a miss later, nothing more.
            coro.close()
            return None
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _coming(self, page: PageId) -> bool:
        """Whether ``page`` is being fetched or written to the page store right now."""
        return page in self._filling or page in self._page_flight or page in self._partial

    # metadata --------------------------------------------------------------------------------
    def resolve(self, path: str) -> Resolved:
        return self.mounts.resolve(normalize_path(path))

    def _virtual_dir(self, path: str) -> str | None:
        """A path no mount covers but under which mounts exist: shown as a directory."""
        normalized = normalize_path(path)
        if self.mounts.child_mounts(normalized):
            return normalized
        return None

    async def stat(self, path: str, *, attributes: bool = False) -> FileStatus:
        """Status of ``path``. With ``attributes``, a file's attributes are filled in where its
        store keeps them: a status cached from a listing (which has none) is looked up again."""
        try:
            resolved = self.resolve(path)
        except NotFound:
            virtual = self._virtual_dir(path)
            if virtual is None:
                raise
            return FileStatus(path=virtual, size=0, mtime=0.0, is_dir=True)
        status = await self._status(resolved, attributes=attributes)
        if status is None:
            raise NotFound("no such file or directory", resolved.path)
        return status

    async def _status(self, resolved: Resolved, *, attributes: bool = False) -> FileStatus | None:
        mount = resolved.mount
        if resolved.key == "":
            return FileStatus(path=resolved.path, size=0, mtime=0.0, is_dir=True)
        cache_key = mount.object_uri(resolved.key)
        if self.staged is not None:
            staged = self.staged(cache_key, resolved.path)
            if staged is not None:
                return staged[0]
        cached = self.metadata.get_status(cache_key)
        if (
            cached is not None
            and mount.policy.is_fresh(cached.fetched_at, self._clock())
            and not (attributes and self._lacks_attributes(cached.status, mount))
        ):
            self.stats.metadata_hits += 1
            if cached.status is None or cached.status.path == resolved.path:
                return cached.status
            return _with_path(cached.status, resolved.path)
        self.stats.metadata_misses += 1
        return await self._meta_flight.do(cache_key, lambda: self._revalidate(resolved, cache_key))

    def _lacks_attributes(self, status: FileStatus | None, mount: Mount) -> bool:
        return (
            status is not None
            and not status.is_dir
            and status.attributes is None
            and self.store_for(mount).supports_attributes
        )

    async def _revalidate(self, resolved: Resolved, cache_key: str) -> FileStatus | None:
        self.stats.revalidations += 1
        store = self.store_for(resolved.mount)
        status: FileStatus | None
        try:
            async with self._ufs_slots:
                info = await store.head(resolved.key)
            status = file_status(resolved.path, info)
        except NotFound:
            status = await self._directory_status(resolved, store)
        self._record_status(cache_key, status)
        return status

    async def _directory_status(self, resolved: Resolved, store: UnderStore) -> FileStatus | None:
        if self.mounts.child_mounts(resolved.path):
            return FileStatus(path=resolved.path, size=0, mtime=0.0, is_dir=True)
        async with self._ufs_slots:
            page = await store.list(resolved.key + "/", delimiter="/", limit=1)
        if page.objects or page.prefixes:
            return FileStatus(path=resolved.path, size=0, mtime=0.0, is_dir=True)
        return None

    def _record_status(
        self, cache_key: str, status: FileStatus | None, *, keep_attributes: bool = False
    ) -> None:
        previous = self.metadata.replace_status(
            cache_key, status, self._clock(), keep_attributes=keep_attributes
        )
        if previous is None or previous.is_dir:
            return
        if status is None or status.version_tag != previous.version_tag:
            old = FileId(cache_key, previous.version_tag)
            self.stats.stale_dropped_files += 1
            self._spawn(self.pages.delete_file(old.key))

    async def list(self, path: str) -> list[FileStatus]:
        try:
            resolved = self.resolve(path)
        except NotFound:
            virtual = self._virtual_dir(path)
            if virtual is None:
                raise
            return [
                FileStatus(path=join_path(virtual, name), size=0, mtime=0.0, is_dir=True)
                for name in self.mounts.child_mounts(virtual)
            ]
        mount = resolved.mount
        cache_key = mount.object_uri(resolved.key) + "/"
        cached = self.metadata.get_listing(cache_key)
        if cached is not None and mount.policy.is_fresh(cached.fetched_at, self._clock()):
            self.stats.metadata_hits += 1
            return cached.entries
        self.stats.metadata_misses += 1
        return await self._list_flight.do(cache_key, lambda: self._list_ufs(resolved, cache_key))

    async def _list_ufs(self, resolved: Resolved, cache_key: str) -> builtins.list[FileStatus]:
        store = self.store_for(resolved.mount)
        prefix = resolved.key + "/" if resolved.key else ""
        entries: dict[str, FileStatus] = {}
        token: str | None = None
        while True:
            async with self._ufs_slots:
                page = await store.list(prefix, delimiter="/", token=token, limit=1000)
            for info in page.objects:
                name = info.key[len(prefix):].strip("/")
                if not name or "/" in name:
                    continue
                child = join_path(resolved.path, name)
                status = file_status(child, info)
                entries[name] = status
                if not status.is_dir:
                    self._record_status(
                        resolved.mount.object_uri(info.key), status, keep_attributes=True
                    )
            for pfx in page.prefixes:
                name = pfx[len(prefix):].strip("/")
                if name and "/" not in name and name not in entries:
                    entries[name] = FileStatus(
                        path=join_path(resolved.path, name), size=0, mtime=0.0, is_dir=True
                    )
            token = page.next_token
            if not token:
                break
        for name in self.mounts.child_mounts(resolved.path):
            entries[name] = FileStatus(
                path=join_path(resolved.path, name), size=0, mtime=0.0, is_dir=True
            )
        if not entries and resolved.key:
            found = await self._status(resolved)
            if found is None:
                raise NotFound("no such directory", resolved.path)
            if not found.is_dir:
                raise NotADirectory("not a directory", resolved.path)
        result = [entries[name] for name in sorted(entries)]
        self.metadata.put_listing(cache_key, result, self._clock())
        return result

    # reads -----------------------------------------------------------------------------------
    async def open(self, path: str, if_match: str | None = None) -> OpenedFile:
        """Resolve and stat ``path`` for reading, checking a pinned version if given."""
        resolved = self.resolve(path)
        status = await self._status(resolved)
        if status is None:
            raise NotFound("no such file", resolved.path)
        if status.is_dir:
            raise IsADirectory("is a directory", resolved.path)
        if if_match is not None:
            if_match = self.landed.get(if_match, if_match)
        if if_match is not None and if_match != status.entity_tag:
            # The reader knows another version (a write through another worker, say): look at
            # the under store once before refusing.
            cache_key = resolved.mount.object_uri(resolved.key)
            fresh = await self._meta_flight.do(
                cache_key, lambda: self._revalidate(resolved, cache_key)
            )
            if fresh is None:
                raise NotFound("no such file", resolved.path)
            if not fresh.is_dir:
                status = fresh
        if if_match is not None and if_match != status.entity_tag:
            raise StaleVersion(
                "the file changed since it was opened (version "
                f"{if_match} is no longer current)",
                resolved.path,
            )
        file_id = FileId(resolved.mount.object_uri(resolved.key), status.version_tag)
        store = self.store_for(resolved.mount)
        if self.staged is not None:
            staged = self.staged(file_id.ufs_uri, resolved.path)
            if staged is not None and staged[0].version_tag == status.version_tag:
                store = staged[1]  # the bytes of a write-back write not uploaded yet
        return OpenedFile(resolved, status, file_id, store)

    def open_now(self, path: str, if_match: str | None = None) -> OpenedFile | None:
        """``open`` where it needs no I/O and no state of the loop's changes: the file's status
        is cached and fresh, no write of it is staged, and a pinned version is the cached one.
        Safe from any thread (the metadata store locks); None when ``open`` must run on the
        loop, which also reports every error. Counted by the caller (``count_metadata_hit``).
        """
        try:
            resolved = self.resolve(path)
        except DepotError:
            return None
        mount = resolved.mount
        if resolved.key == "":
            return None
        cache_key = mount.object_uri(resolved.key)
        store = self._stores.get(mount.path)
        if store is None or (self.staged is not None and self.staged(cache_key, resolved.path)):
            return None
        cached = self.metadata.get_status(cache_key)
        if (
            cached is None
            or cached.status is None
            or cached.status.is_dir
            or not mount.policy.is_fresh(cached.fetched_at, self._clock())
        ):
            return None
        status = cached.status
        if status.path != resolved.path:
            status = _with_path(status, resolved.path)
        if if_match is not None and self.landed.get(if_match, if_match) != status.entity_tag:
            return None
        return OpenedFile(resolved, status, FileId(cache_key, status.version_tag), store)

    def count_metadata_hit(self) -> None:
        self.stats.metadata_hits += 1

    def count_hits(self, pages: builtins.list[PageId], nbytes: int) -> None:
        """Account pages read from the page store outside ``read_chunks`` (hot lanes), and
        mark them used for eviction."""
        self.stats.hits += len(pages)
        self.stats.bytes_from_cache += nbytes
        for page in pages:
            self.pages.touch(page)

    def plan(self, opened: OpenedFile, rng: ByteRange) -> PagePlan:
        page_size = self.pages.page_size
        indexes = list(rng.pages(page_size))
        key = opened.file_id.key
        # A page whose bytes arrived and are being written to the page store is served from
        # them, without the UFS: a hit for the reader, even before the write lands.
        filling = self._filling
        cached = sum(
            1 for i in indexes
            if (page := PageId(key, i)) in filling or self.pages.contains(page)
        )  # fmt: skip
        return PagePlan(indexes, cached)

    def _page_bounds(self, opened: OpenedFile, index: int) -> tuple[int, int]:
        start = index * self.pages.page_size
        return start, min(start + self.pages.page_size, opened.status.size)

    async def read_chunks(
        self, opened: OpenedFile, rng: ByteRange, scratch: bytearray
    ) -> AsyncGenerator[memoryview, None]:
        """Yield the bytes of ``rng`` in order, page by page.

        Cached pages are read (and verified) into ``scratch``; the caller must consume each
        chunk before asking for the next. Missing pages are fetched ahead, up to the read window,
        while earlier ones are being sent. A first page that is neither cached nor being fetched
        is streamed: its bytes are yielded as they arrive from the UFS (in several chunks).
        """
        page_size = self.pages.page_size
        key = opened.file_id.key
        indexes = list(rng.pages(page_size))
        ahead: dict[int, asyncio.Future[Buffer]] = {}
        view = memoryview(scratch)
        streaming = -1  # the page this read started streaming
        if indexes:
            # Before any read-ahead is queued, so that this page has the first UFS slot.
            if self._maybe_stream(opened, indexes[0]):
                streaming = indexes[0]
            self._follow_stream(opened, indexes[0], indexes[-1])
        try:
            for pos, index in enumerate(indexes):
                self._schedule_ahead(opened, indexes, pos, ahead)
                page_start, page_end = self._page_bounds(opened, index)
                lo = max(rng.start, page_start) - page_start
                hi = min(rng.end, page_end) - page_start
                fut = ahead.pop(index, None)
                if fut is None:
                    page = PageId(key, index)
                    held = self.pages.held(page)
                    if held is not None:  # sent from the memory tier, not copied
                        self.pages.touch(page)
                        self.stats.hits += 1
                        self.stats.bytes_from_cache += hi - lo
                        yield memoryview(held)[lo:hi]
                        continue
                    out = view[: hi - lo]
                    if await self.pages.read_into(page, lo, out):
                        self.stats.hits += 1
                        self.stats.bytes_from_cache += hi - lo
                        yield out
                        continue
                fill = self._partial.get(PageId(key, index))
                if fill is not None:
                    if fut is not None:
                        fut.cancel()  # joined the same flight; the fill has the bytes first
                    elif index != streaming:
                        self.stats.ufs_read_shared += 1
                    self.pages.touch(PageId(key, index))  # a use (the memory tier counts it)
                    self.stats.misses += 1
                    self.stats.bytes_from_ufs += hi - lo
                    # Hand on each stretch of [lo, hi) as soon as it is in.
                    while lo < hi:
                        got = fill.received
                        if got > lo:
                            upto = min(got, hi)
                            yield fill.view[lo:upto]
                            lo = upto
                        elif fill.error is not None:
                            raise fill.error
                        elif fill.done:
                            raise StaleVersion(
                                "the file changed while it was being read", opened.resolved.path
                            )
                        else:
                            await fill.changed()
                    continue
                if fut is None:
                    fut = asyncio.ensure_future(self._fetch_page(opened, index))
                data = await fut
                self.pages.touch(PageId(key, index))  # a use (the memory tier counts it)
                self.stats.misses += 1
                self.stats.bytes_from_ufs += hi - lo
                yield memoryview(data)[lo:hi]
        finally:
            for fut in ahead.values():
                fut.cancel()

    def _maybe_stream(self, opened: OpenedFile, index: int) -> bool:
        """Start streaming page ``index`` unless it is cached or already coming (False).

        Only pages of a pinned version (an ETag) are streamed: bytes handed on before the page
        is whole must be of that version, which the store guarantees under ``If-Match``. A page
        already being fetched whole (read-ahead, prefetch, load) is waited for as before.
        """
        page = PageId(opened.file_id.key, index)
        if not opened.status.etag or self._coming(page) or self.pages.contains(page):
            return False
        start, end = self._page_bounds(opened, index)
        fill = _Fill(end - start)
        self._partial[page] = fill

        def finished(task: asyncio.Future[Buffer]) -> None:
            if self._partial.get(page) is fill:
                del self._partial[page]
            if task.cancelled():
                fill.finish(None, asyncio.CancelledError())
            else:
                error = task.exception()
                fill.finish(None if error is not None else task.result(), error)

        task = asyncio.ensure_future(
            self._page_flight.do(page, lambda: self._fill_page(opened, index, page, fill))
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(finished)
        return True

    def _follow_stream(self, opened: OpenedFile, first: int, last: int) -> None:
        """Fetch ahead of readers that go through a file in order.

        Each file remembers the highest page asked for lately. A request that starts near it is
        part of a sequential stream (a cold epoch, a model load, the parallel lanes of one large
        read), so the pages after it are fetched into the cache now: a store that serves
        ~100 MB/s per connection needs many requests in flight. Random reads start far from the
        remembered page and cost no extra UFS traffic.

        The window counts fetches in flight (``prefetch_pages``), not pages ahead of the last
        request: a local reader serves the pages already fetched from their files without asking
        the worker, so a window of pages ahead would empty while it does. Each fetch that ends
        starts the next, up to twice the window ahead of the last request.
        """
        window = self._prefetch_pages
        if window == 0:
            return
        key = opened.file_id.key
        streams = self._streams
        stream = streams.pop(key, None)
        if stream is None:
            stream = _Stream(opened, last, last + 1)
            sequential = False
        else:
            sequential = stream.last - 2 * window <= first <= stream.last + window + 1
            stream.opened = opened
            stream.last = max(stream.last, last)
            stream.next = max(stream.next, last + 1)
        streams[key] = stream
        if len(streams) > 4096:
            del streams[next(iter(streams))]
        if sequential:
            self._read_ahead(stream)

    def _read_ahead(self, stream: _Stream) -> None:
        """Start read-ahead fetches of ``stream`` until ``prefetch_pages`` are in flight."""
        window = self._prefetch_pages
        opened = stream.opened
        key = opened.file_id.key
        page_size = self.pages.page_size
        limit = min((opened.status.size - 1) // page_size, stream.last + 2 * window)
        segment = self._segment_size
        if segment:
            segment_end = ((stream.last * page_size) // segment + 1) * segment
            limit = min(limit, (segment_end - 1) // page_size)
        while stream.inflight < window and stream.next <= limit:
            ahead = stream.next
            stream.next += 1
            page = PageId(key, ahead)
            if self._coming(page) or self.pages.contains(page):
                continue
            task = self._spawn(self._prefetch(opened, ahead))
            if task is None:
                return
            stream.inflight += 1
            task.add_done_callback(functools.partial(self._prefetched, stream))

    def _prefetched(self, stream: _Stream, _task: asyncio.Task[Any]) -> None:
        stream.inflight -= 1
        if self._streams.get(stream.opened.file_id.key) is stream:  # not dropped or closed
            self._read_ahead(stream)

    async def _prefetch(self, opened: OpenedFile, index: int) -> None:
        try:
            await self._fetch_page(opened, index)
        except (OSError, asyncio.CancelledError) as exc:
            log.debug("prefetch of page %d of %s failed: %s", index, opened.resolved.path, exc)

    def _schedule_ahead(
        self,
        opened: OpenedFile,
        indexes: builtins.list[int],
        pos: int,
        ahead: dict[int, asyncio.Future[Buffer]],
    ) -> None:
        key = opened.file_id.key
        for index in indexes[pos : pos + self._read_window]:
            page = PageId(key, index)
            if index in ahead or page in self._partial or self.pages.contains(page):
                continue
            ahead[index] = asyncio.ensure_future(self._fetch_page(opened, index))

    async def _fetch_page(self, opened: OpenedFile, index: int) -> Buffer:
        page = PageId(opened.file_id.key, index)
        filling = self._filling.get(page)
        if filling is not None:
            self.stats.ufs_read_shared += 1
            return filling
        streaming = self._partial.get(page)
        if streaming is not None:
            self.stats.ufs_read_shared += 1
            return await streaming.whole()
        if page not in self._page_flight and self.pages.contains(page):
            # Stored since the caller looked (a prefetch or another reader filled it).
            cached = await self.pages.get(page)
            if cached is not None:
                return cached
        before = self._page_flight.shared
        data = await self._page_flight.do(page, lambda: self._fill_page(opened, index, page))
        if self._page_flight.shared != before:
            self.stats.ufs_read_shared += 1
        return data

    async def _fill_page(
        self, opened: OpenedFile, index: int, page: PageId, fill: _Fill | None = None
    ) -> Buffer:
        start, end = self._page_bounds(opened, index)
        status = opened.status
        etag = status.etag if status.etag else None
        try:
            async with self._ufs_slots:
                stats = self.stats
                stats.ufs_reads += 1
                stats.ufs_inflight += 1
                stats.ufs_inflight_peak = max(stats.ufs_inflight_peak, stats.ufs_inflight)
                try:
                    if fill is None:
                        data = await opened.store.get_range(
                            opened.resolved.key, start, end, etag=etag
                        )
                    else:
                        stats.ufs_streamed += 1
                        data = await self._stream_page(opened, start, end, etag, fill)
                finally:
                    stats.ufs_inflight -= 1
        except StaleVersion:
            self._forget(opened)
            raise
        if len(data) != end - start:
            # The object is not the version we resolved: refuse to cache or serve it.
            self._forget(opened)
            raise StaleVersion("the file changed while it was being read", opened.resolved.path)
        self._filling[page] = data
        self._spawn(self._store_page(page, data))
        return data

    async def _stream_page(
        self, opened: OpenedFile, start: int, end: int, etag: str | None, fill: _Fill
    ) -> Buffer:
        """Read a page from the UFS into ``fill``, chunk by chunk, waking its readers."""
        chunks = opened.store.get_range_stream(opened.resolved.key, start, end, etag=etag)
        try:
            async for chunk in chunks:
                if not fill.add(chunk):
                    # More bytes than the page holds: not the version we resolved.
                    raise StaleVersion(
                        "the file changed while it was being read", opened.resolved.path
                    )
        finally:
            await chunks.aclose()
        return fill.ended()  # a short page is refused by the caller

    def _forget(self, opened: OpenedFile) -> None:
        self.metadata.invalidate(opened.file_id.ufs_uri)
        self._spawn(self.pages.delete_file(opened.file_id.key))

    async def _store_page(self, page: PageId, data: Buffer) -> None:
        try:
            await self.pages.put(
                page, data, bypass_os_cache=self._load_bypass and page in self._loading
            )
        except OSError as exc:  # DepotError included: a full or failing disk costs a miss only
            log.warning("could not cache page %s: %s", page, exc)
        finally:
            self._filling.pop(page, None)
            waiter = self._fill_waiters.pop(page, None)
            if waiter is not None:
                waiter.set()

    def record_short_circuit(
        self, pages: int, nbytes: int, touched: Iterable[PageId] = ()
    ) -> int:
        """Account reads a local client served from the page files itself (as hits), and mark
        the pages it names as used for eviction. Returns how many of those are still stored."""
        stats = self.stats
        stats.hits += pages
        stats.bytes_from_cache += nbytes
        stats.short_circuit_hits += pages
        stats.short_circuit_bytes += nbytes
        return sum(1 for page in touched if self.pages.touch(page))

    # preload and free (jobs) ------------------------------------------------------------------
    async def load_range(
        self,
        opened: OpenedFile,
        start: int,
        end: int,
        *,
        verify: bool = False,
        for_reader: bool = False,
    ) -> dict[str, int]:
        """Put the pages of bytes ``[start, end)`` of an opened file into the page store.

        Pages already cached are skipped (with ``verify``, each one is read back first and its
        checksum checked: a damaged page is dropped and loaded again). Missing pages go through the
        single-flight page fetch, in parallel up to the UFS concurrency; no bytes are returned.
        Returns page counts: ``pages`` in the range, ``cached_before``, ``loaded`` (fetched now),
        ``missing`` (with ``verify``: pages the check found absent or damaged), ``cached`` (in the
        store afterwards: fewer than ``pages`` when the quota could not hold them) and
        ``bytes_from_ufs``.
        """
        page_size = self.pages.page_size
        size = opened.status.size
        start, end = max(0, start), min(end, size)
        result = {"pages": 0, "cached_before": 0, "loaded": 0, "missing": 0, "cached": 0,
                  "bytes_from_ufs": 0}
        if start >= end:
            return result
        key = opened.file_id.key
        indexes = range(start // page_size, (end - 1) // page_size + 1)
        result["pages"] = len(indexes)
        if for_reader:
            self._follow_stream(opened, indexes[0], indexes[-1])
        scratch = bytearray(page_size) if verify else None
        todo: builtins.list[int] = []
        for index in indexes:
            page = PageId(key, index)
            if self.pages.contains(page) and (
                scratch is None or await self._page_readable(page, scratch)
            ):
                result["cached_before"] += 1
            else:
                todo.append(index)
        if verify:
            result["missing"] = len(todo)
        if todo:
            fetch = self._fill_for_reader if for_reader else self._load_page
            loaded = sum(await asyncio.gather(*(fetch(opened, i) for i in todo)))
            result["loaded"] = len(todo)
            result["bytes_from_ufs"] = loaded
            if for_reader:  # the reader's misses, which it then reads from the page files
                self.stats.misses += len(todo)
                self.stats.bytes_from_ufs += loaded
            else:
                self.stats.loaded_pages += len(todo)
                self.stats.loaded_bytes += loaded
            await self._stored([PageId(key, i) for i in todo])
        result["cached"] = sum(1 for i in indexes if self.pages.contains(PageId(key, i)))
        return result

    async def _fill_for_reader(self, opened: OpenedFile, index: int) -> int:
        """Fetch one page that a reader on this node reads from its file next (the caller
        waits until it is stored). Not a load: the page goes through the OS page cache, where
        that read finds it, whatever ``preload_direct_io`` says; the reader's own requests
        bound how many are in flight, as for its reads over HTTP.

        A page stored since the caller looked (by the read-ahead or another reader's fill) is
        not read back: the reader reads it, and the length is all this needs."""
        if self.pages.contains(page := PageId(opened.file_id.key, index)) and not self._coming(page):
            start, end = self._page_bounds(opened, index)
            return end - start
        return len(await self._fetch_page(opened, index))

    async def _load_page(self, opened: OpenedFile, index: int) -> int:
        """Fetch one page for a load and wait until it is stored (the bytes are not kept).

        A load slot is held until the page has left the write-behind buffer: when the page
        store writes slower than the UFS delivers, loads wait instead of piling up fetched pages
        in memory, so at most ``ufs_concurrency`` load pages are buffered and their buffers are
        reused rather than fresh memory being touched for every page.
        """
        page = PageId(opened.file_id.key, index)
        loading = self._loading
        async with self._load_slots:
            loading[page] = loading.get(page, 0) + 1
            try:
                nbytes = len(await self._fetch_page(opened, index))
                await self._stored([page])
            finally:
                if loading[page] == 1:
                    del loading[page]
                else:
                    loading[page] -= 1
        return nbytes

    async def _page_readable(self, page: PageId, scratch: bytearray) -> bool:
        """Read a cached page back in full (checksums verified; a damaged page is dropped)."""
        length = self.pages.page_length(page)
        if length is None:
            return False
        try:
            return await self.pages.read_into(
                page, 0, memoryview(scratch)[:length], check_stored=True
            )
        except OSError as exc:
            log.warning("verify of page %s failed: %s", page, exc)
            return False

    async def _stored(self, pages: builtins.list[PageId]) -> None:
        """Wait until fetched pages have left the write-behind buffer (stored or refused)."""
        for page in pages:
            if page in self._filling:
                event = self._fill_waiters.get(page)
                if event is None:
                    event = self._fill_waiters[page] = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), 30.0)

    async def free(self, path: str, *, recursive: bool = False) -> dict[str, int]:
        """Drop this worker's cached pages and metadata of ``path`` (and what lies under it).

        Every version this worker knows of (its metadata cache names them) is dropped. A
        directory without ``recursive`` drops its direct children only. Returns counts of
        ``files`` (versions dropped), ``pages``, ``bytes`` and ``metadata`` entries removed.
        """
        normalized = normalize_path(path)
        roots: builtins.list[tuple[str, bool]] = []  # (object URI, whole tree below it)
        try:
            resolved = self.resolve(normalized)
            roots.append((resolved.mount.object_uri(resolved.key), recursive))
        except NotFound:
            if self._virtual_dir(normalized) is None:
                raise
        if recursive:
            below = "/" if normalized == "/" else normalized + "/"
            for mount in self.mounts.mounts:
                if mount.path != normalized and mount.path.startswith(below):
                    roots.append((mount.ufs_uri, True))
        out = {"files": 0, "pages": 0, "bytes": 0, "metadata": 0}
        for uri, tree in roots:
            found = [(k, st) for k, st in self.metadata.statuses(uri) if k == uri]
            for key, status in self.metadata.statuses(uri + "/"):
                if tree or "/" not in key[len(uri) + 1 :]:
                    found.append((key, status))
            for key, status in found:
                if not status.is_dir:
                    file_key = FileId(key, status.version_tag).key
                    out["bytes"] += sum(
                        self.pages.page_length(PageId(file_key, i)) or 0
                        for i in self.pages.file_pages(file_key)
                    )
                    out["pages"] += await self.pages.delete_file(file_key)
                    out["files"] += 1
                if not tree:
                    out["metadata"] += int(self.metadata.invalidate(key))
            out["metadata"] += int(self.metadata.invalidate(uri))
            if tree:
                out["metadata"] += self.metadata.invalidate_prefix(uri + "/")
            else:
                out["metadata"] += int(self.metadata.invalidate(uri + "/"))
        self.stats.freed_pages += out["pages"]
        return out

    def cache_stats(self) -> dict[str, Any]:
        out = self.stats.to_dict()
        store_stats = self.pages.stats()
        out.update(
            pages=store_stats.pages,
            used_bytes=store_stats.used_bytes,
            capacity_bytes=store_stats.capacity_bytes,
            evictions=store_stats.evictions,
            evicted_bytes=store_stats.evicted_bytes,
            corrupt_dropped=store_stats.corrupt_dropped,
            rejected_pages=store_stats.rejected,
            direct_write_bytes=store_stats.direct_bytes,
            memory_pages=store_stats.memory_pages,
            memory_bytes=store_stats.memory_bytes,
            memory_capacity_bytes=store_stats.memory_capacity_bytes,
            memory_hits=store_stats.memory_hits,
        )
        return out


def _with_path(status: FileStatus, path: str) -> FileStatus:
    return FileStatus(
        path, status.size, status.mtime, status.is_dir, status.etag, status.version,
        status.attributes,
    )


def mount_summary(mounts: MountTable) -> list[Mapping[str, Any]]:
    return [
        {
            "path": m.path,
            "ufs": m.ufs_uri,
            "read_only": m.read_only,
            "metadata": str(m.policy),
            "write_mode": m.write_mode,
        }
        for m in mounts.mounts
    ]
