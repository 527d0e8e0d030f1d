"""``CacheClient``: the async client of the worker API, with a direct-UFS fallback.

It turns the worker's HTTP API into typed calls (``stat``, ``list``, ``read_range``...), splits
large reads into page-aligned requests fetched in parallel into one buffer, pins one version of a
file across those requests (``If-Match``), and, when the worker cannot be reached, serves the
same calls from the under stores named by the mount table so that readers keep going.
"""

from __future__ import annotations

import asyncio
import builtins
import io
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

from depot.client.fallback import UfsFallback
from depot.client.localwrites import (
    LOCAL_WRITE_MIN,
    LocalWrite,
    Slot,
    attribute_headers,
    request_slot,
)
from depot.client.prefetch import OpenPrefetcher
from depot.client.routing import UNREACHABLE, WorkerRouter
from depot.client.shortcircuit import ShortCircuit
from depot.client.uploads import WriteSource, open_source
from depot.core.buffers import alloc_result, finish_result
from depot.core.config import DepotConfig, MountConfig, load_config
from depot.core.directio import DirectIO
from depot.core.errors import DepotError, InvalidArgument, IsADirectory, Unavailable
from depot.core.transport import (
    DEFAULT_ENDPOINT,
    BlockingPool,
    ConnectionPool,
    Response,
    WorkerUnreachable,
    error_from_response,
    parse_endpoint,
    path_query,
)
from depot.core.types import Attributes, FileStatus, parse_rate
from depot.placement.view import merge_mounts

log = logging.getLogger(__name__)

T = TypeVar("T")

READ = "/api/v1/read"
STAT = "/api/v1/stat"
LIST = "/api/v1/list"
INFO = "/api/v1/info"
STATS = "/api/v1/cache/stats"
HEALTH = "/healthz"
JOBS = "/api/v1/jobs"
WRITE = "/api/v1/write"
FILE = "/api/v1/file"
MKDIR = "/api/v1/mkdir"
RENAME = "/api/v1/rename"
CACHE_FREE = "/api/v1/cache/free"
SYNC = "/api/v1/sync"
JOB_DONE = frozenset({"completed", "failed", "stopped"})
# While waiting on a job, how long the workers may be unreachable before the wait gives up.
JOB_WAIT_UNREACHABLE = 60.0

# Reads up to this size are one request and never wait for the worker's page size.
SMALL_READ = 1024 * 1024
# Large reads are cut at page boundaries into chunks of at least this size.
MIN_CHUNK = 1024 * 1024
_UNREACHABLE = UNREACHABLE
# A read tries this many workers of its key before it reads the under store itself.
FAILOVER_WORKERS = 2

# (bytes received, version tag) of each chunk of a large read.
ChunkResults = list[tuple[int, str | None]]
# [start, end) of each chunk of a large read.
ChunkBounds = list[tuple[int, int]]


def resolve_endpoint(
    explicit: str | None,
    config: DepotConfig | None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """The worker URL: ``endpoint=``, else ``DEPOT_ENDPOINT``, else the config, else the default."""
    env = os.environ if environ is None else environ
    if explicit:
        return explicit
    if env.get("DEPOT_ENDPOINT"):
        return env["DEPOT_ENDPOINT"]
    if config is not None and config.client.endpoint:
        return config.client.endpoint
    return DEFAULT_ENDPOINT


def version_of(status: FileStatus) -> str:
    """The entity tag a worker gives this version of a file (what ``If-Match`` expects)."""
    return status.entity_tag


def _content_range_start(value: str | None) -> int | None:
    """``A`` of ``bytes A-B/N``."""
    if not value or not value.startswith("bytes "):
        return None
    first = value[6:].partition("-")[0]
    return int(first) if first.isdigit() else None


def _total_size(response: Response) -> int | None:
    size = response.headers.get("x-depot-size")
    if size is not None and size.isdigit():
        return int(size)
    total = response.headers.get("content-range", "").rpartition("/")[2]
    return int(total) if total.isdigit() else None


class CacheClient:
    """Async client of one worker (any worker's URL will do).

    Not thread-safe: use it from the event loop it was first used on.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        config: DepotConfig | None = None,
        parallelism: int | None = None,
        ufs_fallback: bool | None = None,
        max_connections: int | None = None,
    ) -> None:
        self.config = config if config is not None else load_config()
        settings = self.config.client
        self.endpoint = parse_endpoint(resolve_endpoint(endpoint, self.config)).url
        self.parallelism = max(1, parallelism if parallelism is not None else settings.parallelism)
        self.ufs_fallback = settings.ufs_fallback if ufs_fallback is None else ufs_fallback
        self.router = WorkerRouter(
            self.endpoint,
            self.config,
            max_connections=max_connections or max(32, 2 * self.parallelism),
        )
        self._page_size: int | None = None
        self._fallback: UfsFallback | None = None
        self._retired: list[UfsFallback] = []
        #: Reads of a worker's pages on this node straight from its page files (``None``: off).
        self.short_circuit = (
            ShortCircuit(self.router, self.stat, fills=settings.short_circuit_fills)
            if settings.short_circuit
            else None
        )
        #: Whole-file loads started when a file its mount marks is opened (``prefetch_on_open``).
        self.prefetcher = OpenPrefetcher(self.router, self.config, self.stat)
        #: Aligned buffers and write-behind threads of the local writes' direct writes.
        self.direct_io = DirectIO()
        self.caller_thread_reads = settings.caller_thread_reads
        self._blocking: dict[str, BlockingPool] = {}
        self._blocking_lock = threading.Lock()
        self._blocking_closed = False
        #: Reads served by ``read_now`` and reads it handed back to the event loop path.
        self.read_now_stats = {"served": 0, "handed_back": 0}
        #: The same for stats (``stat_now``: ``info`` from a plain thread).
        self.stat_now_stats = {"served": 0, "handed_back": 0}

    @property
    def pool(self) -> ConnectionPool:
        """The connection pool of the worker this client was given."""
        return self.router.pool(self.endpoint)

    async def __aenter__(self) -> CacheClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        with self._blocking_lock:
            self._blocking_closed = True
            blocking, self._blocking = self._blocking, {}
        for blocking_pool in blocking.values():
            blocking_pool.close()
        await self.prefetcher.close()
        await asyncio.to_thread(self.direct_io.close)
        if self.short_circuit is not None:
            await self.short_circuit.close()  # reports the last hits while the pools are open
        await self.router.aclose()
        for fallback in [*self._retired, *([self._fallback] if self._fallback else [])]:
            await fallback.close()
        self._retired.clear()
        self._fallback = None

    # worker calls ------------------------------------------------------------------------------
    async def _get_json(
        self, route: str, path: str | None = None, pool: ConnectionPool | None = None
    ) -> Any:
        target = route if path is None else path_query(route, path)
        response = await (pool or self.pool).request(target)
        if response.status >= 300:
            raise error_from_response(response, path)
        return response.json()

    async def cluster(self) -> dict[str, Any]:
        """The cluster view of the worker (``GET /api/v1/cluster``): workers, placement, mounts."""
        data = await self._get_json("/api/v1/cluster")
        if not isinstance(data, dict):
            raise WorkerUnreachable(f"worker {self.endpoint} sent a malformed cluster view")
        return data

    async def info(self) -> dict[str, Any]:
        """Worker identity, page size and mounts (``GET /api/v1/info``)."""
        data = await self._get_json(INFO)
        if not isinstance(data, dict) or not isinstance(data.get("page_size"), int):
            raise WorkerUnreachable(f"worker {self.endpoint} sent a malformed info document")
        self._page_size = data["page_size"]
        return data

    async def page_size(self) -> int:
        """The worker's page size (asked once), which large reads are aligned to."""
        if self._page_size is None:
            view = await self.router.current_view()
            if view is not None:
                self._page_size = view.page_size
                return view.page_size
            try:
                await self.info()
            except _UNREACHABLE:
                if not self._can_fall_back():
                    raise
                self._page_size = self.config.cache.page_size
        assert self._page_size is not None
        return self._page_size

    async def cache_stats(self) -> dict[str, Any]:
        """The worker's cache counters (``GET /api/v1/cache/stats``)."""
        if self.short_circuit is not None:
            await self.short_circuit.flush()  # this client's own short-circuit hits count too
        data = await self._get_json(STATS)
        if not isinstance(data, dict):
            raise WorkerUnreachable(f"worker {self.endpoint} sent malformed cache stats")
        return data

    async def health(self) -> bool:
        """Whether the worker answers ``/healthz`` with ``ok``."""
        try:
            data = await self._get_json(HEALTH)
        except _UNREACHABLE:
            return False
        return isinstance(data, dict) and data.get("status") == "ok"

    # jobs: preload and free -------------------------------------------------------------------
    async def _job_request(self, target: str, method: str = "GET", path: str | None = None) -> Any:
        """Ask the worker this client was given, else any other worker of the cluster: every
        worker can create and report jobs (their state lives in the cluster's store)."""
        view = self.router.view
        endpoints = [self.endpoint]
        if view is not None:
            endpoints += [w.endpoint for w in view.workers if w.endpoint != self.endpoint]
        error: DepotError | None = None
        for endpoint in endpoints:
            try:
                response = await self.router.pool(endpoint).request(target, method=method)
            except _UNREACHABLE as exc:
                error = exc
                continue
            if response.status >= 300:
                raise error_from_response(response, path)
            data = response.json()
            if not isinstance(data, dict):
                raise WorkerUnreachable(f"worker {endpoint} sent a malformed job document")
            return data
        assert error is not None
        raise error

    async def submit_job(self, kind: str, path: str, **options: Any) -> dict[str, Any]:
        """Create a job (``kind`` ``load`` or ``free``) and return its first document at once."""
        params = [("kind", kind), ("path", path)]
        for name, value in options.items():
            if value is None or value is False:
                continue
            params.append((name, "1" if value is True else str(value)))
        query = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params)
        doc: dict[str, Any] = await self._job_request(f"{JOBS}?{query}", "POST", path)
        return doc

    async def job(self, job_id: str) -> dict[str, Any]:
        """The document of a job: state, counters, rate, ETA, failures."""
        doc: dict[str, Any] = await self._job_request(f"{JOBS}/{quote(job_id, safe='')}")
        return doc

    async def jobs(self) -> builtins.list[dict[str, Any]]:
        """Every job the cluster remembers, newest first."""
        data = await self._job_request(JOBS)
        jobs = data.get("jobs")
        return [j for j in jobs if isinstance(j, dict)] if isinstance(jobs, builtins.list) else []

    async def stop_job(self, job_id: str) -> dict[str, Any]:
        """Ask a job to stop; its coordinator stops it within about a second."""
        doc: dict[str, Any] = await self._job_request(
            f"{JOBS}/{quote(job_id, safe='')}/stop", "POST"
        )
        return doc

    async def wait_job(
        self,
        job_id: str,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        poll_interval: float = 0.5,
    ) -> dict[str, Any]:
        """Poll a job until it is completed, failed or stopped; returns its final document.

        ``on_progress(doc)`` is called with every document read. Workers that cannot be reached
        (a restart) are waited for up to a minute.
        """
        unreachable_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                doc = await self.job(job_id)
            except _UNREACHABLE:
                now = loop.time()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > JOB_WAIT_UNREACHABLE:
                    raise
                self.router.refresh_soon()
                await asyncio.sleep(poll_interval)
                continue
            unreachable_since = None
            if on_progress is not None:
                on_progress(doc)
            if doc.get("state") in JOB_DONE:
                return doc
            await asyncio.sleep(poll_interval)

    async def load(
        self,
        path: str,
        *,
        recursive: bool = False,
        verify: bool = False,
        bandwidth: int | str | None = None,
        metadata_only: bool = False,
        wait: bool = True,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        poll_interval: float = 0.5,
    ) -> dict[str, Any]:
        """Preload ``path`` into the cluster's cache: each file's segments on their owners.

        ``recursive`` loads a whole tree (else a directory's files, one level); ``verify``
        then checks every page and loads what is missing; ``bandwidth`` (bytes/s, or ``"100MB"``)
        caps the rate; ``metadata_only`` only warms stat/list. Returns the final job document
        (``wait=False``: the first one). Per-file failures are in ``doc["failures"]``.
        """
        await self.router.current_view()
        doc = await self.submit_job(
            "load", path, recursive=recursive, verify=verify,
            bandwidth=parse_rate(bandwidth), metadata_only=metadata_only,
        )
        if not wait:
            return doc
        return await self.wait_job(doc["id"], on_progress, poll_interval)

    async def free(
        self,
        path: str,
        recursive: bool = False,
        *,
        wait: bool = True,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        poll_interval: float = 0.5,
    ) -> dict[str, Any]:
        """Drop the cached pages and metadata of ``path`` on every worker; returns the job."""
        await self.router.current_view()
        doc = await self.submit_job("free", path, recursive=recursive)
        if not wait:
            return doc
        return await self.wait_job(doc["id"], on_progress, poll_interval)

    # prefetch on open (docs/configuration.md#prefetch-on-open) ---------------------------------
    def prefetch_on_open(self, path: str, status: FileStatus | None = None) -> bool:
        """Tell the client that ``path`` was opened for reading (``status``: what the open saw).

        When its mount's ``prefetch_on_open`` patterns match, the whole file is loaded into the
        cache of its segments' owners in the background, at most once per version of the file
        within ``prefetcher.window`` seconds. Returns whether a prefetch started; never raises
        and never waits (call it on this client's event loop).
        """
        return self.prefetcher.on_open(path, status)

    async def prefetch(self, path: str, status: FileStatus | None = None) -> dict[str, int]:
        """Load the whole file into the cache of its owners now and wait (what an open of a
        marked file starts in the background), whatever the patterns. Returns the owners' page
        counts: ``pages``, ``cached_before``, ``loaded``, ``cached``, ``bytes_from_ufs``."""
        if status is None:
            status = await self.stat(path)
        if status.is_dir:
            raise IsADirectory("is a directory", status.path)
        return await self.prefetcher.load(path, status)

    @property
    def prefetch_stats(self) -> dict[str, int]:
        """Counters of this client's prefetches on open (see ``OpenPrefetcher.stats``)."""
        return dict(self.prefetcher.stats)

    async def stat(self, path: str, *, attributes: bool = False) -> FileStatus:
        """Status of a file or directory. ``attributes``: fill in a file's content headers and
        user metadata where its store keeps them (the worker may ask the store for them)."""
        target = path_query(STAT, path) + ("&attributes=1" if attributes else "")

        async def from_worker(pool: ConnectionPool) -> FileStatus:
            response = await pool.request(target)
            if response.status >= 300:
                raise error_from_response(response, path)
            data = response.json()
            try:
                return FileStatus.from_dict(data)
            except (KeyError, TypeError, ValueError, AttributeError):
                raise WorkerUnreachable(
                    f"worker {self.endpoint} sent a malformed status for {path}"
                ) from None

        status = await self._call(from_worker, lambda fb: fb.stat(path), path)
        if self.short_circuit is not None:
            self.short_circuit.saw(status)
        return status

    async def list(self, path: str) -> list[FileStatus]:
        """The entries of a directory, sorted by name."""
        return [FileStatus.from_dict(entry) for entry in await self.list_entries(path)]

    async def list_entries(self, path: str) -> builtins.list[dict[str, Any]]:
        """The entries of a directory, sorted by name, as the worker sends them: dicts of
        ``path``, ``size``, ``mtime``, ``type``, ``etag`` and ``version``, checked for shape.

        Why: data loaders list directories of tens of thousands of files, and building a
        ``FileStatus`` for each entry costs more than receiving and parsing the listing.
        """

        async def from_worker(pool: ConnectionPool) -> builtins.list[dict[str, Any]]:
            data = await self._get_json(LIST, path, pool)
            entries = data.get("entries") if isinstance(data, dict) else None
            if not isinstance(entries, builtins.list) or not _are_entries(entries):
                raise WorkerUnreachable(
                    f"worker {self.endpoint} sent a malformed listing for {path}"
                )
            return entries

        async def from_ufs(fallback: UfsFallback) -> builtins.list[dict[str, Any]]:
            return [status.to_dict() for status in await fallback.list(path)]

        return await self._call(from_worker, from_ufs, path)

    # reads ---------------------------------------------------------------------------------------
    async def read_range(
        self,
        path: str,
        start: int,
        end: int | None = None,
        *,
        version: str | None = None,
        size: int | None = None,
    ) -> bytes:
        """Bytes ``[start, end)`` of ``path`` (``end=None``: to the end of the file).

        A range past the end of the file is cut short, as files do. ``start < 0`` with
        ``end=None`` reads the last ``-start`` bytes. ``version`` (an entity tag from
        ``version_of``) pins the version: if the file changed, ``StaleVersion`` is raised. Without
        it, the bytes of one call still all come from one version. ``size``, when the caller knows
        it, saves a round trip on large reads.
        """
        if start < 0:
            if end is not None:
                raise InvalidArgument("a negative start is only allowed with end=None")
            return await self._read_suffix(path, -start, version)
        if size is not None:
            end = size if end is None else min(end, size)
        if end is not None:
            if end <= start:
                return b""
            if end - start <= SMALL_READ or size is not None:
                result, view = alloc_result(end - start)
                count = await self.read_range_into(path, start, end, view, version=version)
                return finish_result(result, view, count)
        # Unknown extent: the first chunk tells the file's size and version. A stat runs beside
        # it so that, for a large file, the other chunks go out at once instead of one
        # first-chunk round trip (a full under-store latency when cold) later.
        chunk = self._chunk_size(await self.page_size())
        first_end = (start // chunk + 1) * chunk
        if end is not None:
            first_end = min(first_end, end)
        first_task = asyncio.ensure_future(self._first_chunk(path, start, first_end, version))
        stat_task = asyncio.ensure_future(self.stat(path)) if version is None else None
        try:
            if stat_task is not None:
                await asyncio.wait((first_task, stat_task), return_when=asyncio.FIRST_COMPLETED)
                early = self._early_rest(stat_task, first_task, start, first_end, end)
                if early is not None:
                    status, stop = early
                    tag = version_of(status)
                    result, view = alloc_result(stop - start)
                    rest = len(view) - (first_end - start)
                    count_task = asyncio.ensure_future(
                        self.read_range_into(path, first_end, stop, view[first_end - start :], version=tag)
                    )
                    try:
                        first, _, first_tag = await first_task
                        count = await count_task
                    except BaseException:
                        count_task.cancel()
                        raise
                    if first_tag == tag and len(first) == first_end - start and count == rest:
                        view[: len(first)] = first
                        return finish_result(result, view, len(first) + count)
                    # The file changed between the stat and the first chunk: read it again,
                    # pinned to the version the first chunk came from.
                    return await self.read_range(path, start, end, version=first_tag)
            first, total, first_tag = await first_task
        finally:
            if stat_task is not None and not stat_task.done():
                stat_task.cancel()
        stop = total if end is None else min(end, total)
        if start + len(first) >= stop:
            return bytes(first[: max(0, stop - start)])
        result, view = alloc_result(stop - start)
        view[: len(first)] = first
        done = len(first)
        count = await self.read_range_into(
            path, start + done, stop, view[done:], version=version or first_tag
        )
        return finish_result(result, view, done + count)

    @staticmethod
    def _early_rest(
        stat_task: asyncio.Future[FileStatus],
        first_task: asyncio.Future[tuple[bytes | bytearray, int, str | None]],
        start: int,
        first_end: int,
        end: int | None,
    ) -> tuple[FileStatus, int] | None:
        """The status and end of the read if the stat answered first and more than one chunk is left."""
        if first_task.done() or not stat_task.done() or stat_task.cancelled():
            return None
        if stat_task.exception() is not None:
            return None
        status = stat_task.result()
        if status.is_dir:
            return None
        stop = status.size if end is None else min(end, status.size)
        if stop <= first_end:
            return None
        return status, stop

    async def read_range_into(
        self,
        path: str,
        start: int,
        end: int,
        out: memoryview,
        *,
        version: str | None = None,
    ) -> int:
        """Receive bytes ``[start, end)`` into ``out``; returns the count (fewer at EOF).

        Large ranges are cut at page boundaries and fetched over up to ``parallelism``
        connections at once, each straight into its slice of ``out``.
        """
        length = end - start
        if length <= 0:
            return 0
        if len(out) < length:
            raise InvalidArgument(f"buffer of {len(out)} bytes is too small for {length}")
        if length <= SMALL_READ:
            return (await self._read_chunk(path, start, end, out[:length], version))[0]
        chunk = self._chunk_size(await self.page_size())
        bounds: ChunkBounds = []
        pos = start
        while pos < end:
            stop = min(end, (pos // chunk + 1) * chunk)
            segment_end = self.router.segment_end(pos)
            if segment_end is not None:
                stop = min(stop, segment_end)  # one request, one owner
            bounds.append((pos, stop))
            pos = stop
        results = await self._read_chunks(path, start, bounds, out, version)
        if version is None:
            tags = {tag for _, tag in results if tag is not None}
            if len(tags) > 1:
                # The file changed during this unpinned read: read it again as one version.
                first_tag = next(tag for _, tag in results if tag is not None)
                results = await self._read_chunks(path, start, bounds, out, first_tag)
        total = 0
        for (lo, hi), (count, _) in zip(bounds, results, strict=True):
            total += count
            if count < hi - lo:
                break
        return total

    async def _read_chunks(
        self,
        path: str,
        start: int,
        bounds: ChunkBounds,
        out: memoryview,
        version: str | None,
    ) -> ChunkResults:
        results: ChunkResults = [(0, None)] * len(bounds)
        jobs = iter(enumerate(bounds))

        async def run() -> None:
            for index, (lo, hi) in jobs:
                dest = out[lo - start : hi - start]
                results[index] = await self._read_chunk(path, lo, hi, dest, version)

        lanes = min(self.parallelism, len(bounds))
        if lanes == 1:
            await run()
            return results
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(lanes):
                    group.create_task(run())
        except BaseExceptionGroup as group_error:
            # A failed chunk cancels the others (they must stop writing into ``out``); report the
            # first real error, not the group.
            raise _first_error(group_error) from None
        return results

    async def _read_chunk(
        self, path: str, start: int, end: int, dest: memoryview, version: str | None
    ) -> tuple[int, str | None]:
        """One ranged request into ``dest``: (bytes received, the version's tag)."""
        if self.short_circuit is not None:
            local = await self.short_circuit.read_into(path, start, end, dest, version)
            if local is not None:
                return local

        async def from_worker(pool: ConnectionPool) -> tuple[int, str | None]:
            headers = [("Range", f"bytes={start}-{end - 1}")]
            if version is not None:
                headers.append(("If-Match", version))
            response = await pool.request(path_query(READ, path), headers, dest=dest)
            status = response.status
            if status == 416:
                return 0, None  # at or past the end of the file
            if status >= 300:
                raise error_from_response(response, path)
            if status == 206:
                if _content_range_start(response.headers.get("content-range")) != start:
                    raise WorkerUnreachable(
                        f"worker {self.endpoint} answered a range other than the one asked for"
                    )
            elif start != 0:
                raise WorkerUnreachable(f"worker {self.endpoint} ignored the Range header")
            return response.length, response.headers.get("etag")

        async def from_ufs(fallback: UfsFallback) -> tuple[int, str | None]:
            return await fallback.read_into(path, start, end, dest, version), None

        return await self._call(from_worker, from_ufs, path, start)

    def read_now(
        self, path: str, start: int, end: int, dest: memoryview, version: str | None
    ) -> int | None:
        """Receive ``[start, end)`` into ``dest`` in the calling thread, on a blocking
        connection to the worker of the bytes; the count (fewer at the end of the file).

        For plain threads (never the event loop's): a read through the loop pays a thread
        hand-off each way, which on a hot small read costs as much as the request itself. None
        when the loop must serve the read: the feature is off, routes are not known or due for
        a refresh, the worker is marked down, the range crosses a segment, or the worker could
        not be reached or timed out (the loop path then fails over, as for any read). An error
        the worker reports (a changed file, a missing one) is raised as the loop path would.
        """
        if end <= start:
            return None
        pool = self._caller_thread_pool(path, start)
        if pool is None:
            return None
        segment_end = self.router.segment_end(start)
        if segment_end is not None and end > segment_end:
            return None
        headers = [("Range", f"bytes={start}-{end - 1}")]
        if version is not None:
            headers.append(("If-Match", version))
        stats = self.read_now_stats
        try:
            response = pool.get_into(path_query(READ, path), headers, dest[: end - start])
        except Unavailable:  # unreachable, timed out, or this client closed
            stats["handed_back"] += 1
            return None
        status = response.status
        if status == 416:
            count = 0  # at or past the end of the file
        elif status >= 300:
            error = error_from_response(response, path)
            if isinstance(error, _UNREACHABLE):
                stats["handed_back"] += 1
                return None
            raise error
        elif (
            status == 206 and _content_range_start(response.headers.get("content-range")) != start
        ) or (status == 200 and start != 0):
            stats["handed_back"] += 1
            return None  # not the range asked for: the loop path reports it
        else:
            count = response.length
        stats["served"] += 1
        return count

    def stat_now(self, path: str) -> FileStatus | None:
        """``stat(path)`` asked in the calling thread, on a blocking connection to the worker
        of the path (``caller_thread_reads``).

        Why: a cached stat is a few tens of microseconds of work in the worker, and the two
        thread hand-offs of the event loop path cost as much again; data loaders stat every
        file. None when the loop must ask, under the same conditions as ``read_now``. An error
        the worker reports (no such file) is raised as the loop path would.
        """
        pool = self._caller_thread_pool(path, 0)
        if pool is None:
            return None
        stats = self.stat_now_stats
        try:
            response = pool.get(path_query(STAT, path))
        except Unavailable:  # unreachable, timed out, an oversized answer, or this client closed
            stats["handed_back"] += 1
            return None
        if response.status >= 300:
            error = error_from_response(response, path)
            if isinstance(error, _UNREACHABLE):
                stats["handed_back"] += 1
                return None
            raise error
        try:
            status = FileStatus.from_dict(response.json())
        except (KeyError, TypeError, ValueError, AttributeError, Unavailable):
            stats["handed_back"] += 1
            return None  # the loop path asks again and reports a malformed answer
        if self.short_circuit is not None:
            self.short_circuit.saw(status)
        stats["served"] += 1
        return status

    def _caller_thread_pool(self, path: str, offset: int) -> BlockingPool | None:
        """The blocking connections to the worker of ``path`` at ``offset``, for a request
        sent from this plain thread; None when the event loop must send it: the feature is off,
        this is an event loop's thread (never blocked), the routes are not known or due for a
        refresh, the worker is marked down, or its endpoint is TLS."""
        if not self.caller_thread_reads or asyncio.events._get_running_loop():
            return None
        router = self.router
        if not router.view_is_current():
            return None
        endpoint = router.targets(path, offset)[0]
        if router.is_down(endpoint):
            return None
        return self._blocking_pool(endpoint)

    def _blocking_pool(self, endpoint: str) -> BlockingPool | None:
        pool = self._blocking.get(endpoint)
        if pool is not None:
            return pool
        parsed = parse_endpoint(endpoint)
        if parsed.scheme != "http":
            return None  # TLS stays on the event loop
        settings = self.config.client
        with self._blocking_lock:
            if self._blocking_closed:
                return None
            pool = self._blocking.get(endpoint)
            if pool is None:
                # Each wait for bytes is bounded by probe_after where the loop path would probe
                # the worker then: past it, the read is handed to the loop, which does.
                wait = settings.probe_after if settings.probe_after > 0 else settings.timeout
                pool = BlockingPool(
                    parsed,
                    connect_timeout=settings.connect_timeout,
                    timeout=min(wait, settings.timeout),
                )
                self._blocking[endpoint] = pool
        return pool

    async def _first_chunk(
        self, path: str, start: int, end: int, version: str | None
    ) -> tuple[bytes | bytearray, int, str | None]:
        """The bytes of ``[start, end)`` with the file's size and version tag."""

        async def from_worker(pool: ConnectionPool) -> tuple[bytes | bytearray, int, str | None]:
            headers = [("Range", f"bytes={start}-{end - 1}")]
            if version is not None:
                headers.append(("If-Match", version))
            response = await pool.request(path_query(READ, path), headers)
            if response.status == 416:
                return b"", _total_size(response) or start, None
            if response.status >= 300:
                raise error_from_response(response, path)
            total = _total_size(response)
            if total is None:
                raise WorkerUnreachable(f"worker {self.endpoint} did not say the file's size")
            if response.status != 206 and start != 0:
                raise WorkerUnreachable(f"worker {self.endpoint} ignored the Range header")
            return response.body, total, response.headers.get("etag")

        async def from_ufs(fallback: UfsFallback) -> tuple[bytes | bytearray, int, str | None]:
            status = await fallback.stat(path)
            if status.is_dir:
                raise IsADirectory("is a directory", status.path)
            tag = version or version_of(status)
            stop = min(end, status.size)
            if stop <= start:
                return b"", status.size, tag
            buf = bytearray(stop - start)
            count = await fallback.read_into(path, start, stop, memoryview(buf), tag)
            del buf[count:]
            return buf, status.size, tag

        return await self._call(from_worker, from_ufs, path, start)

    async def _read_suffix(self, path: str, length: int, version: str | None) -> bytes:
        if length == 0:
            return b""
        if length <= SMALL_READ:

            async def from_worker(pool: ConnectionPool) -> bytes | None:
                headers = [("Range", f"bytes=-{length}")]
                if version is not None:
                    headers.append(("If-Match", version))
                response = await pool.request(path_query(READ, path), headers)
                if response.status == 416:
                    return b""
                if response.status >= 300:
                    raise error_from_response(response, path)
                return bytes(response.body)

            async def from_ufs(fallback: UfsFallback) -> bytes | None:
                return None  # needs the size: take the general path below

            # The suffix lies in the file's last segment, unknown here: route by the first.
            data = await self._call(from_worker, from_ufs, path)
            if data is not None:
                return data
        status = await self.stat(path)
        if status.is_dir:
            raise IsADirectory("is a directory", status.path)
        return await self.read_range(
            path,
            max(0, status.size - length),
            status.size,
            version=version or version_of(status),
            size=status.size,
        )

    def _chunk_size(self, page_size: int) -> int:
        pages = max(1, -(-MIN_CHUNK // page_size))
        return page_size * pages

    # writes (docs/writes.md) ---------------------------------------------------------------------
    async def write(
        self, path: str, data: WriteSource, *, attributes: Attributes | None = None
    ) -> FileStatus:
        """Write ``data`` as the whole new content of ``path``; returns the new status.

        ``data``: bytes-like, a binary file object (read from its position, in chunks), or an
        async iterable of bytes (spooled first: memory stays bounded). The write goes to the
        worker that owns the path (segment 0 of its key); the next worker is tried only when the
        owner refused the connection, before any byte was sent. There is no under-store fallback
        for writes: an unreachable cluster is an error. ``attributes`` (content headers, user
        metadata) are stored with the object where its under store keeps them.
        """
        size = _known_length(data)
        local = None
        if size is None or size >= LOCAL_WRITE_MIN:
            local = await self.open_local_write(path, size)
        if local is not None:
            try:
                if isinstance(data, bytes | bytearray | memoryview):
                    await asyncio.to_thread(local.write, data)
                elif hasattr(data, "read"):
                    await asyncio.to_thread(local.write_from, data)
                else:
                    async for chunk in data:
                        await asyncio.to_thread(local.write, chunk)
                return await local.commit(attributes)
            except BaseException:
                await local.abort()
                raise
        headers = attribute_headers(attributes)
        async with await open_source(data) as source:
            upload = source.upload

            async def send(pool: ConnectionPool) -> FileStatus:
                response = await pool.request(
                    path_query(WRITE, path), headers, method="PUT", body=upload
                )
                return self._status_of(response, path)

            return await self._write_call(send, path)

    async def open_local_write(
        self, path: str, size_hint: int | None = None
    ) -> LocalWrite | None:
        """A local write of ``path`` (docs/writes.md, "Local writes"), or None where it does not
        apply (see ``local_slot``). The caller writes into it, then commits it (or aborts it)."""
        slot = await self.local_slot(path, size_hint)
        if slot is None:
            return None
        try:
            fd = await asyncio.to_thread(
                os.open, slot.file, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            )
        except OSError as exc:
            log.info("local writes to %s are not possible here (%s)", slot.file, exc)
            await slot.abort()
            return None
        return LocalWrite(slot, fd, self.direct_io)

    async def local_slot(self, path: str, size_hint: int | None = None) -> Slot | None:
        """A staging file of ``path``'s owner worker to write here, or None where local writes
        do not apply: local writes or short-circuit off, the owner not on this node or down,
        the mount not ``write-back``."""
        short_circuit = self.short_circuit
        if short_circuit is None or not self.config.client.local_writes:
            return None
        router = self.router
        view = await router.current_view()
        if view is None:
            return None
        try:
            mount = view.table.resolve(path).mount
        except DepotError:
            return None  # the HTTP write says what is wrong with the path
        if mount.write_mode != "write-back":
            return None
        endpoint = router.write_targets(path)[0]
        if router.is_down(endpoint):
            return None
        if (await short_circuit.local_store(endpoint)).store is None:
            return None
        try:
            return await request_slot(router.pool(endpoint), path, size_hint)
        except _UNREACHABLE as exc:
            router.failed(endpoint, exc)
            return None  # the HTTP write fails over, or says the cluster is unreachable

    async def delete(self, path: str) -> None:
        """Delete a file (directories: delete their files; an empty one then disappears)."""

        async def send(pool: ConnectionPool) -> None:
            response = await pool.request(path_query(FILE, path), method="DELETE")
            if response.status >= 300:
                raise error_from_response(response, path)

        await self._write_call(send, path)

    async def mkdir(self, path: str) -> None:
        """Check that a directory may be made at ``path`` (object stores keep none: it exists
        once a file is written under it)."""

        async def send(pool: ConnectionPool) -> None:
            response = await pool.request(path_query(MKDIR, path), method="POST")
            if response.status >= 300:
                raise error_from_response(response, path)

        await self._write_call(send, path)

    async def rename(self, src: str, dst: str) -> FileStatus:
        """Move a file (copy, then delete: not atomic on object stores)."""
        target = f"{RENAME}?src={quote(src, safe='')}&dst={quote(dst, safe='')}"

        async def send(pool: ConnectionPool) -> FileStatus:
            response = await pool.request(target, method="POST")
            return self._status_of(response, src)

        status = await self._write_call(send, src)
        # The worker that owns dst may remember it as missing (or as an older file): drop that.
        handled = self.router.write_targets(src)[0]
        owner = self.router.write_targets(dst)[0]
        if owner != handled:
            try:
                await self.router.pool(owner).request(path_query(CACHE_FREE, dst), method="POST")
            except DepotError as exc:
                log.info("could not refresh %s on %s after a rename: %s", dst, owner, exc)
        return status

    async def sync(
        self, path: str | None = None, wait: bool = True, deadline: float | None = None
    ) -> dict[str, Any]:
        """Write-back: make the writes pending now durable in the under store.

        With ``path``, its owner worker's pending write of it; without, every worker's pending
        writes. With ``wait``, returns once they are uploaded (asking again while the worker
        answers 504 Timeout, until ``deadline`` seconds, default forever) and raises the
        recorded error of a write that failed permanently. Returns the per-worker answers:
        ``{"synced": bool, "dirty_bytes", "queue_length", "failures", "workers": [...]}``.
        """
        router = self.router
        await router.current_view()
        if path is not None:
            endpoints = router.write_targets(path)[:1]
        else:
            view = router.view
            endpoints = [w.endpoint for w in view.workers] if view is not None else []
            endpoints = endpoints or [self.endpoint]
        per_call = max(1.0, self.config.client.timeout - 5.0)
        end = None if deadline is None else asyncio.get_running_loop().time() + deadline
        query = [] if path is None else [f"path={quote(path, safe='')}"]
        if wait:
            query.append("wait=1")

        async def one(endpoint: str) -> dict[str, Any]:
            while True:
                params = list(query)
                limit = per_call
                if end is not None:
                    limit = max(0.0, min(limit, end - asyncio.get_running_loop().time()))
                if wait:
                    params.append(f"timeout={limit:.3f}")
                target = SYNC + ("?" + "&".join(params) if params else "")
                response = await router.pool(endpoint).request(target, method="POST")
                if response.status == 504 and wait and (
                    end is None or asyncio.get_running_loop().time() < end
                ):
                    continue  # still uploading: ask again
                if response.status >= 300:
                    raise error_from_response(response, path)
                data = response.json()
                if not isinstance(data, dict):
                    raise WorkerUnreachable(f"worker {endpoint} sent a malformed sync answer")
                return {"endpoint": endpoint, **data}

        answers = await asyncio.gather(*(one(e) for e in endpoints))
        return {
            "path": path,
            "synced": all(a.get("synced") for a in answers),
            "dirty_bytes": sum(int(a.get("dirty_bytes") or 0) for a in answers),
            "queue_length": sum(int(a.get("queue_length") or 0) for a in answers),
            "failures": [f for a in answers for f in a.get("failures") or []],
            "workers": answers,
        }

    @staticmethod
    def _status_of(response: Response, path: str) -> FileStatus:
        if response.status >= 300:
            raise error_from_response(response, path)
        try:
            return FileStatus.from_dict(response.json())
        except (KeyError, TypeError, ValueError, AttributeError):
            raise WorkerUnreachable(f"worker sent a malformed status for {path}") from None

    async def _write_call(self, send: Callable[[ConnectionPool], Awaitable[T]], path: str) -> T:
        """Send a write to the owner of ``path``; the next worker only if the connection was
        refused (no byte sent). Never the under store."""
        router = self.router
        await router.current_view()
        error: DepotError | None = None
        for endpoint in router.write_targets(path)[:FAILOVER_WORKERS]:
            try:
                result = await send(router.pool(endpoint))
            except _UNREACHABLE as exc:
                router.failed(endpoint, exc)
                if not exc.connect_failed:
                    raise  # bytes may have reached the worker: do not send them elsewhere
                error = exc
                continue
            router.mark_up(endpoint)
            return result
        assert error is not None
        raise error

    # fallback --------------------------------------------------------------------------------------
    def _mounts_for_fallback(self) -> builtins.list[MountConfig]:
        """The mounts to read the under store by: the cluster's (with this client's own
        credentials put back), else this client's config."""
        view = self.router.view
        if view is not None and view.mounts:
            return list(merge_mounts(view.mounts, self.config.mounts))
        return list(self.config.mounts)

    def _can_fall_back(self) -> bool:
        return self.ufs_fallback and bool(self._mounts_for_fallback())

    def _fallback_for(self, error: DepotError) -> UfsFallback:
        """The UFS fallback to use after ``error``, or raise ``error`` if there is none."""
        if not self.ufs_fallback:
            raise error
        mounts = self._mounts_for_fallback()
        if not mounts:
            raise type(error)(
                f"{error.message}; no fallback to the under store: no mounts are configured "
                "for this client (set them in the config file)",
                error.path,
            ) from error
        if self._fallback is None or self._fallback.mount_configs != mounts:
            if self._fallback is not None:
                self._retired.append(self._fallback)
            self._fallback = UfsFallback(mounts, self.config.ufs)
        return self._fallback

    async def _call(
        self,
        from_worker: Callable[[ConnectionPool], Awaitable[T]],
        from_ufs: Callable[[UfsFallback], Awaitable[T]],
        path: str | None = None,
        offset: int = 0,
    ) -> T:
        """Ask the worker that owns ``path`` at ``offset``; if it cannot be reached, the next
        worker of the key; then the under store (when allowed)."""
        router = self.router
        if path is not None:
            await router.current_view()
        targets = router.targets(path, offset)
        if router.is_down(targets[0]) and self._can_fall_back():
            # Every worker of the key is marked down: do not wait on them again.
            return await from_ufs(self._fallback_for(WorkerUnreachable("workers marked down")))
        error: DepotError | None = None
        for endpoint in targets[:FAILOVER_WORKERS]:
            if error is not None and router.is_down(endpoint):
                break
            # A request still running after probe_after makes the router check that the worker
            # answers at all; a hung one has its requests failed at once (see WorkerRouter.suspect).
            timer = router.watch(endpoint)
            try:
                result = await from_worker(router.pool(endpoint))
            except _UNREACHABLE as exc:
                error = exc
                router.failed(endpoint, exc)
                continue
            finally:
                if timer is not None:
                    timer.cancel()
            router.mark_up(endpoint)
            return result
        assert error is not None
        return await from_ufs(self._fallback_for(error))


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first error of a task group that is not the cancellation of a sibling."""
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            return _first_error(error)
        if not isinstance(error, asyncio.CancelledError):
            return error
    first: BaseException = group.exceptions[0]
    return first


__all__ = ["CacheClient", "resolve_endpoint", "version_of"]


_STR_OR_NONE = frozenset((str, type(None)))
_NUMBER = frozenset((float, int))


def _are_entries(entries: builtins.list[Any]) -> bool:
    """Whether every listing entry has the shape ``FileStatus.to_dict`` gives it (a pass per
    field: a function call per entry would cost as much as the rest of a large listing)."""
    try:
        return (
            {type(e) for e in entries} <= {dict}
            and {type(e["path"]) for e in entries} <= {str}
            and {type(e["size"]) for e in entries} <= {int}
            and {type(e["mtime"]) for e in entries} <= _NUMBER
            and {e["type"] for e in entries} <= {"file", "directory"}
            and {type(e.get("etag")) for e in entries} <= _STR_OR_NONE
            and {type(e.get("version")) for e in entries} <= _STR_OR_NONE
        )
    except (KeyError, TypeError):
        return False


def _known_length(data: WriteSource) -> int | None:
    """The bytes a write of ``data`` will hold, where that is known before reading it."""
    if isinstance(data, bytes | bytearray | memoryview):
        return memoryview(data).nbytes
    file: Any = data
    try:
        return max(0, os.fstat(file.fileno()).st_size - int(file.tell()))
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
