"""Short-circuit local reads: pages of a worker on the same node, read from its page files.

When the worker that owns a chunk runs on this node (same kernel boot id, its cache dirs visible
at the same paths and holding its id file; see ``depot.pagestore.direct.check_local``), the
client reads the chunk's pages straight from the page files instead of over HTTP:

- the file's version comes from a stat through the worker (``CacheClient.stat``), reused for at
  most ``STATUS_REUSE`` seconds and never longer than the mount's metadata policy allows; a read
  pinned to another version (``If-Match``) is left to HTTP, which answers it or says it is stale;
- the page ids are derived exactly as the worker derives them
  (``FileId(ufs_uri, version_tag).key``, the ufs URI from the cluster view's mount table), and
  the page file paths from the page ids alone;
- every 64 KiB block a read touches is verified (xxh3, the page store's own code) before the
  bytes count as read; they land straight in the caller's buffer (``os.preadv``);
- a page that is missing (evicted, not cached yet, another worker's segment) or does not check
  out sends the whole chunk to the worker over HTTP, which reads the page itself (and drops and
  fetches again a damaged one). Page files are immutable once renamed into place and an open fd
  survives an unlink, so eviction while reading cannot give a torn page.

Hits are counted by the client and reported to the worker about once a second and on close
(``POST /api/v1/cache/hits``), with the page ids read, so that the worker's hit counters and its
LRU/LFU order account for them. Reads run on the event loop when the bytes are in the page cache
(``RWF_NOWAIT``) and in a thread otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from depot.client.routing import UNREACHABLE, WorkerRouter
from depot.core.errors import DepotError
from depot.core.singleflight import SingleFlight
from depot.core.transport import path_query
from depot.core.types import FileId, FileStatus, PageId
from depot.namespace.paths import normalize_path
from depot.namespace.policy import PolicyKind
from depot.pagestore.direct import (
    BLOCK_SIZE,
    RWF_NOWAIT,
    CorruptPage,
    LocalStore,
    PageFiles,
    check_local,
    encode_touched,
    host_identity,
)

log = logging.getLogger(__name__)

INFO = "/api/v1/info"
HITS = "/api/v1/cache/hits"
LOAD = "/api/v1/cache/load"
# A status from the worker is reused this long at most (never past the mount's policy).
STATUS_REUSE = 1.0
# How long the answer "is this worker local?" is kept before asking again.
PROBE_TTL = 30.0
REPORT_INTERVAL = 1.0
# Reads served in callers' threads within this long share one wake-up of the event loop.
HANDOFF_DELAY = 0.25
MAX_TOUCH_CHARS = 32 * 1024
_STATUS_CACHE = 4096


@dataclass(slots=True)
class ShortCircuitStats:
    """What the short-circuit path did in this client."""

    reads: int = 0  # chunks served from page files that were there (hits, reported)
    pages: int = 0
    bytes: int = 0
    missing: int = 0  # chunks sent to HTTP: a page was not in the local store
    corrupt: int = 0  # chunks sent to HTTP: a page did not check out
    skipped: int = 0  # chunks sent to HTTP: pinned to a version that is not current
    fills: int = 0  # chunks missing pages that the worker was asked to put into its store first
    fill_bytes: int = 0  # bytes then read here from the pages it stored
    reports: int = 0  # hit reports sent to workers

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(slots=True)
class _Local:
    store: LocalStore | None
    files: PageFiles | None
    checked_at: float


@dataclass(slots=True)
class _Pending:
    pages: int = 0
    bytes: int = 0
    touched: dict[str, set[int]] = field(default_factory=dict)


class ShortCircuit:
    """The short-circuit read path of one ``CacheClient`` (one event loop)."""

    def __init__(
        self,
        router: WorkerRouter,
        stat: Callable[[str], Awaitable[FileStatus]],
        *,
        report_interval: float = REPORT_INTERVAL,
        fills: bool = True,
    ) -> None:
        self.router = router
        self._stat = stat
        self.report_interval = report_interval
        #: Chunks of a page or more that miss pages are put into the worker's store first
        #: (``POST /api/v1/cache/load?for_reader=1``) and then read here, not sent over HTTP.
        self.fills = fills
        self.stats = ShortCircuitStats()
        self._locals: dict[str, _Local] = {}
        self._probes: SingleFlight[_Local] = SingleFlight()
        self._statuses: OrderedDict[str, tuple[FileStatus, float]] = OrderedDict()
        self._statuses_lock = threading.Lock()
        self._stat_flight: SingleFlight[FileStatus] = SingleFlight()
        self._pending: dict[str, _Pending] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._reporting: set[asyncio.Task[None]] = set()
        self._closed = False
        #: This node's identity (``depot.pagestore.direct.host_identity``), compared with the
        #: one each worker advertises.
        self.identity = host_identity()
        #: The event loop this client runs on (known after its first read): callers in other
        #: threads hand their accounting to it.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handoff: list[tuple[str, str, list[int], int]] = []
        self._handoff_lock = threading.Lock()
        #: The loop was asked to take the hand-over list (under ``_handoff_lock``).
        self._handoff_due = False
        self.handoff_delay = HANDOFF_DELAY

    # which workers are local ------------------------------------------------------------------
    async def local_store(self, endpoint: str) -> _Local:
        """Whether ``endpoint``'s page store can be read here (asked once per ``PROBE_TTL``)."""
        known = self._locals.get(endpoint)
        if known is not None and time.monotonic() - known.checked_at < PROBE_TTL:
            return known
        return await self._probes.do(endpoint, lambda: self._probe(endpoint))

    async def _probe(self, endpoint: str) -> _Local:
        store: LocalStore | None = None
        try:
            # A small document any live worker serves at once: a hung worker must not hold
            # the read that asked (it then goes over HTTP, where failover handles the hang).
            async with asyncio.timeout(self.router.config.client.connect_timeout):
                response = await self.router.pool(endpoint).request(INFO)
            info = response.json() if response.status == 200 else None
            store, why = check_local(info, self.identity)
        except (*UNREACHABLE, DepotError, ValueError, TimeoutError) as exc:
            why = f"no info ({exc or 'timed out'})"
        if store is None:
            log.debug("no short-circuit reads from %s: %s", endpoint, why)
        else:
            log.info("short-circuit reads from %s: pages in %s", endpoint, list(store.dirs))
        local = _Local(store, store.files() if store else None, time.monotonic())
        self._locals[endpoint] = local
        return local

    def is_local(self, path: str, offset: int) -> bool:
        """Whether the worker for these bytes was found readable here (no I/O: what is known).

        Readers use it to skip read-ahead, which only adds a copy when reads are local.
        """
        return self._known_local(path, offset) is not None

    def known_remote(self, path: str, offset: int) -> bool:
        """Whether the worker for these bytes was found not readable here (within
        ``PROBE_TTL``; no I/O). Reads over HTTP from the caller's thread are for those only:
        a worker not checked yet is checked on the event loop, and a local one is read here."""
        router = self.router
        if self._closed:
            return True
        if router.view is None:
            return False
        local = self._locals.get(router.targets(path, offset)[0])
        return (
            local is not None
            and local.files is None
            and time.monotonic() - local.checked_at < PROBE_TTL
        )

    def _known_local(self, path: str, offset: int) -> tuple[str, PageFiles] | None:
        """(endpoint, its page files) when the worker for these bytes is up and was found
        readable here within ``PROBE_TTL``; from what is known only, no I/O."""
        router = self.router
        if self._closed or router.view is None:
            return None
        endpoint = router.targets(path, offset)[0]
        if router.is_down(endpoint):
            return None
        local = self._locals.get(endpoint)
        if local is None or local.files is None or (
            time.monotonic() - local.checked_at >= PROBE_TTL
        ):
            return None
        return endpoint, local.files

    # versions ---------------------------------------------------------------------------------
    def saw(self, status: FileStatus) -> None:
        """Remember a status the client got from a worker (a stat), as of now."""
        if status.is_dir:
            return
        key = status.path
        with self._statuses_lock:  # plain threads report stats too (CacheClient.stat_now)
            self._statuses[key] = (status, time.monotonic())
            self._statuses.move_to_end(key)
            while len(self._statuses) > _STATUS_CACHE:
                self._statuses.popitem(last=False)

    async def _status(self, path: str, kind: PolicyKind, max_age: float) -> FileStatus:
        if kind is PolicyKind.IMMUTABLE:
            reuse = float("inf")
        elif kind is PolicyKind.ALWAYS:
            reuse = 0.0
        else:
            reuse = min(STATUS_REUSE, max_age)
        known = self._statuses.get(path)
        if known is not None and 0.0 <= time.monotonic() - known[1] < reuse:
            return known[0]

        async def fetch() -> FileStatus:
            status = await self._stat(path)
            self.saw(status)
            return status

        return await self._stat_flight.do(path, fetch)

    def _known_status(self, path: str, kind: PolicyKind, max_age: float) -> FileStatus | None:
        """The remembered status of ``path`` if the mount's policy still lets it be used."""
        if kind is PolicyKind.ALWAYS:
            return None
        reuse = float("inf") if kind is PolicyKind.IMMUTABLE else min(STATUS_REUSE, max_age)
        known = self._statuses.get(path)
        if known is not None and 0.0 <= time.monotonic() - known[1] < reuse:
            return known[0]
        return None

    # reads ------------------------------------------------------------------------------------
    async def read_into(
        self, path: str, start: int, end: int, dest: memoryview, version: str | None
    ) -> tuple[int, str] | None:
        """Read ``[start, end)`` of ``path`` into ``dest`` from the local page files.

        Returns (bytes read, the version's entity tag), or None when the chunk must go to the
        worker over HTTP (nothing short-circuit could serve, or any doubt).
        """
        if self._closed:
            return None
        self._loop = asyncio.get_running_loop()
        router = self.router
        view = await router.current_view()
        if view is None:
            return None
        endpoint = router.targets(path, start)[0]
        if router.is_down(endpoint):
            return None
        local = await self.local_store(endpoint)
        files = local.files
        if files is None:
            return None
        try:
            resolved = view.table.resolve(path)
            canonical = normalize_path(path)
            policy = resolved.mount.policy
            status = await self._status(canonical, policy.kind, policy.max_age)
        except (*UNREACHABLE, DepotError):
            return None  # let the worker answer (and report the error)
        plan = self._plan(resolved.mount.object_uri(resolved.key), status, files, start, end,
                          dest, version)
        if plan is None:
            return None
        key, jobs, tag = plan
        filled = False
        while True:
            try:
                done = _read_pages(files, jobs, RWF_NOWAIT, None) if RWF_NOWAIT else 0
                if done < len(jobs):
                    done += await _in_thread(_read_pages, files, jobs[done:], 0, _scratch())
            except _Missing as exc:
                if filled or not self._fills(jobs, files.page_size):
                    self._failed(path, exc)
                    return None
                if not await self._fill(endpoint, path, start, min(end, status.size)):
                    self._failed(path, exc)
                    return None
                filled = True
                continue
            except (CorruptPage, OSError) as exc:
                self._failed(path, exc)
                return None
            break
        nbytes = sum(len(job[3]) for job in jobs)
        if filled:  # the worker counted these as misses when it fetched them
            self.stats.fill_bytes += nbytes
        else:
            self._served(endpoint, key, [job[0].index for job in jobs], nbytes)
        return nbytes, tag

    def read_into_now(
        self, path: str, start: int, end: int, dest: memoryview, version: str | None
    ) -> int | None:
        """``read_into`` in the caller's thread, from what this client already knows: no I/O
        but the page files, no trip to the event loop (the sync fsspec file uses it; a hop to
        the loop thread per read costs as much as copying megabytes).

        None when anything is not known yet (the view, whether the worker is local, a status
        fresh enough for the mount's policy) or a page is missing or damaged: the caller then
        takes the usual path, which finds out.
        """
        view = self.router.view
        known = self._known_local(path, start)
        if known is None or view is None or self._loop is None:
            return None
        endpoint, files = known
        try:
            resolved = view.table.resolve(path)
            canonical = normalize_path(path)
        except DepotError:
            return None
        status = self._known_status(canonical, resolved.mount.policy.kind,
                                    resolved.mount.policy.max_age)
        if status is None:
            return None
        plan = self._plan(resolved.mount.object_uri(resolved.key), status, files, start, end,
                          dest, version)
        if plan is None:
            return None
        key, jobs, _ = plan
        try:
            _read_pages(files, jobs, 0, _thread_scratch())
        except (CorruptPage, _Missing, OSError) as exc:
            self._loop.call_soon_threadsafe(self._failed, path, exc)
            return None
        nbytes = sum(len(job[3]) for job in jobs)
        indexes = [job[0].index for job in jobs]
        with self._handoff_lock:
            self._tally(len(indexes), nbytes)
            self._handoff.append((endpoint, key, indexes, nbytes))
            # One wake of the loop takes what the reads of the next ``handoff_delay`` hand
            # over. A wake per read (the loop thread taking the GIL on the other core) cost a
            # local 8 MiB read about a sixth of its time.
            wake = not self._handoff_due
            self._handoff_due = True
        if wake:
            self._loop.call_soon_threadsafe(self._take_handoff_later)
        return nbytes

    def _take_handoff_later(self) -> None:
        asyncio.get_running_loop().call_later(self.handoff_delay, self._take_handoff)

    def _take_handoff(self) -> None:
        """Count, on the loop, the hits of reads other threads served (``read_into_now``)."""
        with self._handoff_lock:
            served, self._handoff = self._handoff, []
            self._handoff_due = False  # a read after this asks again
        for endpoint, key, indexes, nbytes in served:
            self._count(endpoint, key, indexes, nbytes)

    def _plan(
        self,
        object_uri: str,
        status: FileStatus,
        files: PageFiles,
        start: int,
        end: int,
        dest: memoryview,
        version: str | None,
    ) -> tuple[str, list[tuple[PageId, int, int, memoryview]], str] | None:
        """(page key, the page reads, the version's tag) of a chunk, or None if it is not one
        short-circuit serves (a directory, another version, nothing to read)."""
        if status.is_dir:
            return None
        tag = status.entity_tag
        if version is not None and version != tag:
            self.stats.skipped += 1
            return None
        stop = min(end, status.size)
        if stop <= start:
            return None
        key = FileId(object_uri, status.version_tag).key
        page_size = files.page_size
        jobs: list[tuple[PageId, int, int, memoryview]] = []
        pos = start
        while pos < stop:
            index = pos // page_size
            page_start = index * page_size
            page_end = min(page_start + page_size, status.size)
            hi = min(stop, page_end)
            jobs.append(
                (PageId(key, index), page_end - page_start, pos - page_start,
                 dest[pos - start : hi - start])
            )
            pos = hi
        return key, jobs, tag

    def _fills(self, jobs: list[tuple[PageId, int, int, memoryview]], page_size: int) -> bool:
        """Whether a chunk that misses pages is filled by the worker and then read here: with
        ``fills`` on, a chunk of a page or more (a smaller read of a cold page goes over HTTP,
        which hands on its first bytes before the page is whole)."""
        return self.fills and sum(len(job[3]) for job in jobs) >= page_size

    async def _fill(self, endpoint: str, path: str, start: int, end: int) -> bool:
        """Ask the local worker to put the pages of ``[start, end)`` into its store (fetching
        the missing ones from the UFS, shared with any other reader of them), and wait."""
        target = f"{path_query(LOAD, path)}&start={start}&end={end}&for_reader=1"
        router = self.router
        # A slow store makes a slow fill; a hung worker is found by the router's health check
        # after probe_after, as for reads over HTTP, which fails this request at once.
        timer = router.watch(endpoint)
        try:
            response = await router.pool(endpoint).request(target, method="POST")
        except (*UNREACHABLE, DepotError):
            return False
        finally:
            if timer is not None:
                timer.cancel()
        if response.status >= 300:
            return False
        self.stats.fills += 1
        try:
            counts = response.json()
            # Pages its store could not keep (a cache smaller than the chunk) are read over HTTP.
            return bool(counts["cached"] >= counts["pages"])
        except (*UNREACHABLE, KeyError, TypeError):
            return False

    def _failed(self, path: str, exc: BaseException) -> None:
        if isinstance(exc, CorruptPage):
            self.stats.corrupt += 1
            log.warning("short-circuit read of %s: %s; reading it through the worker", path, exc)
        elif isinstance(exc, _Missing):
            self.stats.missing += 1
        else:
            log.warning("short-circuit read of %s failed: %s; reading it through the worker",
                        path, exc)

    def _served(self, endpoint: str, key: str, indexes: list[int], nbytes: int) -> None:
        with self._handoff_lock:
            self._tally(len(indexes), nbytes)
        self._count(endpoint, key, indexes, nbytes)

    def _tally(self, pages: int, nbytes: int) -> None:
        """Count one read in ``stats`` (under ``_handoff_lock``: reader threads count too)."""
        self.stats.reads += 1
        self.stats.pages += pages
        self.stats.bytes += nbytes

    # hit reports ------------------------------------------------------------------------------
    def _count(self, endpoint: str, key: str, indexes: list[int], nbytes: int) -> None:
        pending = self._pending.get(endpoint)
        if pending is None:
            pending = self._pending[endpoint] = _Pending()
        pending.pages += len(indexes)
        pending.bytes += nbytes
        pending.touched.setdefault(key, set()).update(indexes)
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.report_interval, self._report_soon)

    def _report_soon(self) -> None:
        self._timer = None
        task = asyncio.ensure_future(self._send_pending())
        self._reporting.add(task)
        task.add_done_callback(self._reporting.discard)

    async def flush(self) -> None:
        """Send the hits counted so far to their workers now, and wait for reports already on
        their way (a caller reading the worker's stats next must find every hit in them)."""
        await self._send_pending()
        if self._reporting:
            await asyncio.gather(*self._reporting, return_exceptions=True)

    async def _send_pending(self) -> None:
        self._take_handoff()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        for endpoint, counts in pending.items():
            query = f"pages={counts.pages}&bytes={counts.bytes}"
            touch = encode_touched(counts.touched)
            if len(touch) <= MAX_TOUCH_CHARS:  # else: counted, recency not refreshed
                query += "&touch=" + quote(touch, safe=":,-")
            try:
                async with asyncio.timeout(self.router.config.client.connect_timeout):
                    response = await self.router.pool(endpoint).request(
                        f"{HITS}?{query}", method="POST"
                    )
            except (*UNREACHABLE, DepotError, TimeoutError) as exc:
                log.debug("could not report short-circuit hits to %s: %s", endpoint, exc)
                continue
            if response.status < 300:
                self.stats.reports += 1

    async def close(self) -> None:
        """Report what is left; later reads go over HTTP."""
        self._closed = True
        await self.flush()

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.stats.to_dict(),
            "local_workers": sorted(e for e, loc in self._locals.items() if loc.store),
        }


class _Missing(Exception):
    """A page of the chunk is not in the local store."""


def _scratch() -> memoryview:
    return memoryview(bytearray(2 * BLOCK_SIZE))


_thread_local = threading.local()


def _thread_scratch() -> memoryview:
    """A scratch buffer of the calling thread, reused by its reads."""
    scratch: memoryview | None = getattr(_thread_local, "scratch", None)
    if scratch is None:
        scratch = _thread_local.scratch = _scratch()
    return scratch


def _read_pages(
    files: PageFiles,
    jobs: list[tuple[PageId, int, int, memoryview]],
    flags: int,
    scratch: memoryview | None,
) -> int:
    """Read the pages of ``jobs`` in order; returns how many were read before one would block
    (with ``RWF_NOWAIT``). Raises ``_Missing`` or ``CorruptPage``."""
    for done, (page, length, offset, out) in enumerate(jobs):
        try:
            if not files.read_into(page, length, offset, out, flags, scratch):
                raise _Missing(str(page))
        except BlockingIOError:
            if not flags:
                raise
            return done
        except OSError as exc:
            if flags and exc.errno == errno.EOPNOTSUPP:  # no RWF_NOWAIT on this filesystem
                return done
            raise
    return len(jobs)


async def _in_thread(fn: Callable[..., int], *args: Any) -> int:
    """Run ``fn`` in a thread to the end even if the caller is cancelled: it writes into the
    caller's buffer, which must not be reused before it is done."""
    job = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(job)
            break
        except asyncio.CancelledError:
            if job.done():
                result = job.result()
                cancelled = True
                break
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


__all__ = ["ShortCircuit", "ShortCircuitStats"]
