"""``depot://``: the fsspec filesystem over the worker API (async core, sync facade).

``fsspec.filesystem("depot", endpoint="http://127.0.0.1:7070")``; paths are namespace paths with
or without the ``depot://`` prefix. Files open for reading (``rb``) or for writing a whole new
file (``wb``: uploaded on close, docs/writes.md). A file open for reading pins the version it saw at
open time, so it returns bytes of that version or raises ``StaleVersion``, never a mix. Sequential
reads are served from read-ahead blocks fetched while the caller consumes the previous ones;
large single reads are split into page-aligned requests fetched in parallel. Opening a file that
its mount marks with ``prefetch_on_open`` (model weights) starts the load of the whole file into
the cache in the background (docs/configuration.md#prefetch-on-open).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import io
import logging
import os
import tempfile
import threading
import weakref
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from fsspec.asyn import AsyncFileSystem, sync
from fsspec.callbacks import DEFAULT_CALLBACK, Callback
from fsspec.spec import AbstractBufferedFile
from fsspec.utils import stringify_path

from depot.client.buffers import BufferPool
from depot.client.client import (
    MIN_CHUNK,
    SMALL_READ,
    CacheClient,
    resolve_endpoint,
    version_of,
)
from depot.client.localwrites import LocalWrite
from depot.client.shortcircuit import ShortCircuit
from depot.core.buffers import alloc_result, finish_result, keep_freed_blocks
from depot.core.config import DepotConfig, load_config
from depot.core.errors import IsADirectory, NotADirectory, StaleVersion, Unsupported
from depot.core.types import FileStatus, parse_size

T = TypeVar("T")

log = logging.getLogger(__name__)

# Largest read-ahead block made to the size of the caller's reads.
_WHOLE_BLOCK_MAX = 64 * 1024 * 1024
#: Read-ahead blocks received at once on blocking connections, per filesystem: two keep a
#: worker's two senders busy (worker/lanes.py) without starving the reader of a core.
BLOCK_THREADS = 2
# Results from this size on are where glibc's trimming costs page faults (``large_results``).
KEEP_FREED_MIN = 1024 * 1024
_READ_ONLY = "this file is open for reading (open a file with mode 'wb' to write it)"


class ReadOnlyFileSystem(Unsupported, NotImplementedError):
    """A write through ``depot://``: an ``OSError`` (ENOTSUP) that fsspec callers also catch as
    ``NotImplementedError``, the usual signal of an operation a filesystem does not offer."""


def _info(status: FileStatus) -> dict[str, Any]:
    return {
        "name": status.path,
        "size": status.size,
        "type": "directory" if status.is_dir else "file",
        "mtime": status.mtime,
        "etag": status.etag,
        "version": status.version,
    }


def _infos(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Listing entries (``FileStatus.to_dict``'s shape) turned into ``_info``'s, in place.

    No call per entry, and no second dict each: ten thousand new dicts are megabytes of new
    memory per listing. A 10,000-entry ``ls`` took 43-49 ms that way against 18-29 ms in
    place (docs/benchmarks.md, tenth look).
    """
    for entry in entries:
        entry["name"] = entry.pop("path")
        entry["mtime"] = float(entry["mtime"])
        entry.setdefault("etag", None)
        entry.setdefault("version", None)
        entry.pop("attributes", None)
    return entries


def _status(info: dict[str, Any]) -> FileStatus:
    return FileStatus(
        path=info["name"],
        size=int(info["size"]),
        mtime=float(info.get("mtime") or 0.0),
        is_dir=info.get("type") == "directory",
        etag=info.get("etag"),
        version=info.get("version"),
    )


class _MemoryBudget:
    """Bytes of copy buffers that concurrent transfers on one event loop may hold at once."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._free = total
        self._changed = asyncio.Condition()

    async def take(self, amount: int) -> int:
        amount = min(amount, self.total)
        async with self._changed:
            await self._changed.wait_for(lambda: self._free >= amount)
            self._free -= amount
        return amount

    async def give(self, amount: int) -> None:
        async with self._changed:
            self._free += amount
            self._changed.notify_all()


class _LoopState:
    """What a filesystem keeps per event loop: its client and its transfer budget."""

    def __init__(self, client: CacheClient) -> None:
        self.client = client
        self._budget: _MemoryBudget | None = None

    def budget(self, total: int) -> _MemoryBudget:
        if self._budget is None:
            self._budget = _MemoryBudget(total)
        return self._budget


def _report_local_hits(
    loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState],
) -> None:
    """Send the pending short-circuit hit counts of every loop's client (at exit or collection)."""
    for loop, state in list(loops.items()):
        short_circuit = state.client.short_circuit
        if short_circuit is None or loop.is_closed() or not loop.is_running():
            continue
        future = asyncio.run_coroutine_threadsafe(short_circuit.flush(), loop)
        if getattr(loop, "_thread_id", None) == threading.get_ident():
            continue  # on the loop's own thread: it runs when this returns
        with contextlib.suppress(Exception):
            future.result(timeout=2.0)


class DepotFileSystem(AsyncFileSystem):  # type: ignore[misc]
    """The depot namespace as an fsspec filesystem (reads, and whole-file writes)."""

    protocol = "depot"
    root_marker = "/"
    cachable = True

    def __init__(
        self,
        endpoint: str | None = None,
        config: DepotConfig | str | os.PathLike[str] | None = None,
        read_ahead: int | str | None = None,
        parallelism: int | None = None,
        ufs_fallback: bool | None = None,
        *,
        asynchronous: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
        batch_size: int | None = None,
        **storage_options: Any,
    ) -> None:
        super().__init__(
            asynchronous=asynchronous, loop=loop, batch_size=batch_size, **storage_options
        )
        if config is None:
            config = load_config()
        elif not isinstance(config, DepotConfig):
            config = load_config(Path(config))
        self.config = config
        settings = config.client
        self.endpoint = resolve_endpoint(endpoint, config)
        self.read_ahead = settings.read_ahead if read_ahead is None else parse_size(read_ahead)
        self.parallelism = settings.parallelism if parallelism is None else max(1, parallelism)
        self.ufs_fallback = settings.ufs_fallback if ufs_fallback is None else ufs_fallback
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )
        self._block_size: int | None = None
        self._buffers: BufferPool | None = None
        self._buffers_lock = threading.Lock()
        # Threads that receive read-ahead blocks on blocking connections (see _read_ahead),
        # made by the process that uses them (a forked child makes its own).
        self._block_threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._block_threads_pid = 0
        # Reads served from the local page store are reported to the worker in batches; a
        # script or CLI that exits without close() must not lose them (nor their LRU touches).
        weakref.finalize(self, _report_local_hits, self._loops)

    # plumbing -----------------------------------------------------------------------------------
    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            client = CacheClient(
                self.endpoint,
                config=self.config,
                parallelism=self.parallelism,
                ufs_fallback=self.ufs_fallback,
            )
            state = self._loops[loop] = _LoopState(client)
        return state

    def client(self) -> CacheClient:
        """The ``CacheClient`` of the running event loop (connections belong to one loop)."""
        return self._loop_state().client

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        """``depot://models/x``, ``depot:///models/x`` and ``/models/x/`` all give ``/models/x``."""
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        text = stringify_path(path)
        if text.startswith("depot://"):
            text = text[8:]
        elif text.startswith("depot:"):
            text = text[6:]
        text = "/" + text.lstrip("/")
        return text.rstrip("/") or "/"

    def unstrip_protocol(self, name: str) -> str:
        return "depot://" + str(self._strip_protocol(name))

    async def _close(self) -> None:
        state = self._loops.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state.client.close()

    def close(self) -> None:
        """Close this filesystem's connections (it stays usable: new ones open on demand)."""
        if self.asynchronous or self.loop is None:
            raise RuntimeError("use 'await fs._close()' on an asynchronous filesystem")
        self._run(self._close())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the filesystem's loop from a plain thread and wait for it."""
        loop = self.loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coro.close()
            raise NotImplementedError("blocking depot call from its own event loop")
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    def client_now(self) -> CacheClient | None:
        """This filesystem's client on its loop, for use from a plain thread (None until the
        loop has made one)."""
        state = self._loops.get(self.loop)
        return state.client if state is not None else None

    def may_read_now(self, path: str, start: int, stop: int) -> bool:
        """Whether ``read_now`` may serve this range (a cheap check before allocating for it)."""
        client = self.client_now()
        if client is None:
            return False
        short_circuit = client.short_circuit
        if short_circuit is not None and short_circuit.is_local(path, start):
            return True
        return client.caller_thread_reads and stop - start <= SMALL_READ

    def read_now(
        self,
        path: str,
        start: int,
        stop: int,
        dest: memoryview,
        version: str | None,
        *,
        any_size: bool = False,
    ) -> int | None:
        """Bytes ``[start, stop)`` read in this plain thread, or None: the event loop must
        serve the read. A local worker's pages are read from its page files; a read of up to
        1 MiB (of any size with ``any_size``: a read-ahead block) from a worker known not to be
        local goes over a blocking connection from this thread
        (``client.caller_thread_reads``), sparing the hand-off to the loop and back."""
        client = self.client_now()
        if client is None:
            return None
        short_circuit = client.short_circuit
        if short_circuit is not None:
            count = short_circuit.read_into_now(path, start, stop, dest, version)
            if count is not None or not short_circuit.known_remote(path, start):
                return count
        if stop - start > SMALL_READ and not any_size:
            return None  # large reads go over several connections at once, from the loop
        return client.read_now(path, start, stop, dest, version)

    def block_threads(self) -> concurrent.futures.ThreadPoolExecutor | None:
        """The threads that receive read-ahead blocks, or None where blocks are received by
        the event loop (``caller_thread_reads`` off, no client yet)."""
        client = self.client_now()
        if client is None or not client.caller_thread_reads:
            return None
        with self._buffers_lock:
            if self._block_threads is None or self._block_threads_pid != os.getpid():
                self._block_threads = concurrent.futures.ThreadPoolExecutor(
                    BLOCK_THREADS, thread_name_prefix="depot-read-ahead"
                )
                self._block_threads_pid = os.getpid()
            return self._block_threads

    def large_results(self, size: int) -> None:
        """Called before results of ``size`` bytes are made, one after another: from 1 MiB,
        freed ones are then reused rather than faulted in again (``keep_freed_blocks``)."""
        if size >= KEEP_FREED_MIN and self.config.client.keep_freed_blocks:
            keep_freed_blocks()

    def read_now_bytes(self, path: str, start: int, stop: int, version: str | None) -> bytes | None:
        """``read_now`` into a new result (None if the loop must serve it)."""
        if not self.may_read_now(path, start, stop):
            return None
        self.large_results(stop - start)
        result, view = alloc_result(stop - start)
        count = self.read_now(path, start, stop, view, version)
        return None if count is None else finish_result(result, view, count)

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        """``_cat_file`` from a plain thread; a range is read in this thread (``read_now``)
        when it can be, without a trip to the event loop."""
        if start is not None and end is not None and 0 <= start < end and not self.asynchronous:
            now = self.read_now_bytes(self._strip_protocol(path), start, end, None)
            if now is not None:
                return now
        data: bytes = sync(self.loop, self._cat_file, path, start, end, **kwargs)
        return data

    def prefetch_on_open(self, path: str, status: FileStatus) -> None:
        """A file was opened for reading: let the client start its prefetch when its mount
        marks it (``prefetch_on_open``). Never waits for the loop, never raises."""
        loop = self.loop
        state = self._loops.get(loop)
        if state is not None and not state.client.prefetcher.wanted(path):
            return  # the common case decided here, without a hop to the loop

        def start() -> None:
            try:
                self.client().prefetch_on_open(path, status)
            except Exception as exc:
                log.debug("prefetch on open of %s not started: %s", path, exc)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to prefetch for
            loop.call_soon_threadsafe(start)

    def buffers(self, block_size: int) -> BufferPool:
        """The pool of read-ahead blocks shared by this filesystem's files."""
        with self._buffers_lock:
            if self._buffers is None or self._buffers.block_size != block_size:
                blocks = max(4, 2 * -(-self.read_ahead // block_size))
                self._buffers = BufferPool(block_size, blocks)
            return self._buffers

    async def _read_block_size(self) -> int:
        if self._block_size is None:
            page = await self.client().page_size()
            self._block_size = page * max(1, -(-MIN_CHUNK // page))
        return self._block_size

    # metadata -------------------------------------------------------------------------------------
    async def _info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        if path == "/":
            try:
                return _info(await self.client().stat(path))
            except FileNotFoundError:
                # No mount at "/": the root is still the directory above every mount.
                return {
                    "name": "/",
                    "size": 0,
                    "type": "directory",
                    "mtime": 0.0,
                    "etag": None,
                    "version": None,
                }
        return _info(await self.client().stat(path))

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        """``_info`` from a plain thread: the stat is asked in this thread
        (``CacheClient.stat_now``) when it can be, without a trip to the event loop."""
        if not self.asynchronous:
            stripped = self._strip_protocol(path)
            client = self.client_now()
            if client is not None and stripped != "/":
                status = client.stat_now(stripped)
                if status is not None:
                    return _info(status)
        result: dict[str, Any] = sync(self.loop, self._info, path, **kwargs)
        return result

    async def _ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        path = self._strip_protocol(path)
        client = self.client()
        try:
            entries = await client.list_entries(path)
        except NotADirectory:
            status = await client.stat(path)
            return [_info(status) if detail else status.path]
        if not detail:
            return [entry["path"] for entry in entries]
        return _infos(entries)

    async def _cache_stats(self) -> dict[str, Any]:
        client = self.client()
        stats = await client.cache_stats()
        return {**stats, "client": {"prefetch_on_open": client.prefetch_stats}}

    def cache_stats(self) -> dict[str, Any]:
        """The worker's cache counters (hits, misses, bytes from cache and from the UFS...);
        under ``client``, this filesystem's own (``prefetch_on_open``: prefetches started...)."""
        result: dict[str, Any] = sync(self.loop, self._cache_stats)
        return result

    # jobs: preload and free ---------------------------------------------------------------
    async def _load(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return await self.client().load(self._strip_protocol(path), **kwargs)

    def load(
        self,
        path: str,
        *,
        recursive: bool = False,
        verify: bool = False,
        bandwidth: int | str | None = None,
        metadata_only: bool = False,
        wait: bool = True,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Preload ``path`` into the cluster's cache (see ``CacheClient.load``); returns the job.

        ``on_progress(doc)`` runs on the filesystem's event-loop thread.
        """
        result: dict[str, Any] = sync(
            self.loop, self._load, path, recursive=recursive, verify=verify,
            bandwidth=bandwidth, metadata_only=metadata_only, wait=wait, on_progress=on_progress,
        )
        return result

    async def _free(self, path: str, recursive: bool = False, **kwargs: Any) -> dict[str, Any]:
        return await self.client().free(self._strip_protocol(path), recursive, **kwargs)

    def free(self, path: str, recursive: bool = False, *, wait: bool = True) -> dict[str, Any]:
        """Drop the cached pages and metadata of ``path`` on every worker; returns the job."""
        result: dict[str, Any] = sync(self.loop, self._free, path, recursive, wait=wait)
        return result

    async def _job(self, job_id: str) -> dict[str, Any]:
        return await self.client().job(job_id)

    def job(self, job_id: str) -> dict[str, Any]:
        """The document of a load or free job."""
        result: dict[str, Any] = sync(self.loop, self._job, job_id)
        return result

    async def _stop_job(self, job_id: str) -> dict[str, Any]:
        return await self.client().stop_job(job_id)

    def stop_job(self, job_id: str) -> dict[str, Any]:
        """Ask a job to stop."""
        result: dict[str, Any] = sync(self.loop, self._stop_job, job_id)
        return result

    def modified(self, path: str) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.info(path)["mtime"], tz=datetime.UTC)

    # reads -----------------------------------------------------------------------------------------
    async def _cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        """Bytes ``[start, end)``; negative values count from the end of the file, as in fsspec."""
        path = self._strip_protocol(path)
        client = self.client()
        start = 0 if start is None else start
        if start < 0 and end is None:
            return await client.read_range(path, start)
        if start < 0 or (end is not None and end < 0):
            status = await client.stat(path)
            if status.is_dir:
                raise IsADirectory("is a directory", status.path)
            if start < 0:
                start = max(0, status.size + start)
            if end is not None and end < 0:
                end = max(0, status.size + end)
            return await client.read_range(
                path, start, end, version=version_of(status), size=status.size
            )
        return await client.read_range(path, start, end)

    async def _cat_ranges(
        self,
        paths: list[str],
        starts: Any,
        ends: Any,
        max_gap: int | None = None,
        batch_size: int | None = None,
        on_error: str = "return",
        **kwargs: Any,
    ) -> list[Any]:
        """Many ranges at once, fetched concurrently (bounded) over the connection pool."""
        if max_gap is not None:
            raise NotImplementedError("max_gap: merge ranges before calling cat_ranges")
        if not isinstance(paths, list):
            raise TypeError("paths must be a list")
        if not isinstance(starts, list | tuple):
            starts = [starts] * len(paths)
        if not isinstance(ends, list | tuple):
            ends = [ends] * len(paths)
        if len(starts) != len(paths) or len(ends) != len(paths):
            raise ValueError("paths, starts and ends must have the same length")
        limit = asyncio.Semaphore(batch_size or self.batch_size or 4 * self.parallelism)

        async def one(path: str, start: int | None, end: int | None) -> bytes:
            async with limit:
                return await self._cat_file(path, start, end)

        out = await asyncio.gather(
            *(one(p, s, e) for p, s, e in zip(paths, starts, ends, strict=True)),
            return_exceptions=True,
        )
        if on_error != "return":
            for item in out:
                if isinstance(item, BaseException):
                    raise item
        return list(out)

    async def _get_file(
        self, rpath: str, lpath: str, callback: Callback = DEFAULT_CALLBACK, **kwargs: Any
    ) -> None:
        """Copy one file to local disk: fetch the next window while the last one is written.

        fsspec runs many of these at once; their buffers come out of one budget per event loop
        so that a recursive ``get`` of large files cannot hold unbounded memory.
        """
        if os.path.isdir(lpath):
            return
        rpath = self._strip_protocol(rpath)
        client = self.client()
        status = await client.stat(rpath)
        if status.is_dir:
            os.makedirs(lpath, exist_ok=True)
            return
        version = version_of(status)
        callback.set_size(status.size)
        window = await self._read_block_size() * self.parallelism
        budget = self._loop_state().budget(4 * window)
        count_buffers = 1 if status.size <= window else 2
        need = await budget.take(min(window, status.size) * count_buffers)
        try:
            with open(lpath, "wb") as out:
                await self._copy_out(client, rpath, version, status.size, window, out, callback)
        finally:
            await budget.give(need)

    async def _copy_out(
        self,
        client: CacheClient,
        rpath: str,
        version: str,
        size: int,
        window: int,
        out: Any,
        callback: Callback,
    ) -> None:
        buffers = [bytearray(min(window, size)) for _ in range(1 if size <= window else 2)]
        pending: asyncio.Future[Any] | None = None
        pos = 0
        turn = 0
        try:
            while pos < size:
                stop = min(size, pos + window)
                view = memoryview(buffers[turn])[: stop - pos]
                count = await client.read_range_into(rpath, pos, stop, view, version=version)
                if count != stop - pos:
                    raise StaleVersion("the file is shorter than when it was opened", rpath)
                if pending is not None:
                    await pending
                pending = asyncio.ensure_future(asyncio.to_thread(out.write, view))
                callback.relative_update(count)
                pos = stop
                turn = (turn + 1) % len(buffers)
        finally:
            if pending is not None:
                await asyncio.gather(pending, return_exceptions=True)
        if pending is not None:
            await pending

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | str | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        if mode in ("wb", "xb"):
            path = self._strip_protocol(path)
            if mode == "xb" and self.exists(path):
                raise FileExistsError(f"file exists: {path}")
            return DepotWriteFile(self, path)
        if mode != "rb":
            raise ReadOnlyFileSystem(f"depot:// cannot open files in mode {mode!r}", path)
        return DepotFile(
            self,
            self._strip_protocol(path),
            block_size=block_size,
            cache_options=cache_options,
            **kwargs,
        )

    # writes (docs/writes.md): whole files, uploaded through the path's owner worker ------------
    async def _pipe_file(self, path: str, value: Any, mode: str = "overwrite", **kw: Any) -> None:
        path = self._strip_protocol(path)
        if mode == "create" and await self._exists(path):
            raise FileExistsError(f"file exists: {path}")
        await self.client().write(path, value)
        self.invalidate_cache(path)

    async def _put_file(
        self,
        lpath: str,
        rpath: str,
        callback: Callback = DEFAULT_CALLBACK,
        mode: str = "overwrite",
        **kw: Any,
    ) -> None:
        rpath = self._strip_protocol(rpath)
        if os.path.isdir(lpath):
            return  # directories exist through the files under them
        if mode == "create" and await self._exists(rpath):
            raise FileExistsError(f"file exists: {rpath}")
        with open(lpath, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            callback.set_size(size)
            await self.client().write(rpath, f)
            callback.relative_update(size)
        self.invalidate_cache(rpath)

    async def _rm_file(self, path: str, **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        await self.client().delete(path)
        self.invalidate_cache(path)

    async def _rm(
        self, path: Any, recursive: bool = False, maxdepth: int | None = None, **kwargs: Any
    ) -> None:
        paths = await self._expand_path(path, recursive=recursive, maxdepth=maxdepth)
        for one in sorted(paths, reverse=True):  # files under a directory before it
            try:
                await self.client().delete(one)
            except (IsADirectory, FileNotFoundError):
                # A directory: it goes away with its files (object stores keep none).
                if not recursive:
                    raise
            self.invalidate_cache(one)

    async def _cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        path1, path2 = self._strip_protocol(path1), self._strip_protocol(path2)
        client = self.client()
        status = await client.stat(path1)
        if status.is_dir:
            return
        version = version_of(status)
        window = 8 * 1024 * 1024

        async def chunks() -> Any:
            pos = 0
            while pos < status.size:
                stop = min(status.size, pos + window)
                yield await client.read_range(path1, pos, stop, version=version, size=status.size)
                pos = stop

        await client.write(path2, chunks())
        self.invalidate_cache(path2)

    async def _mv_file(self, path1: str, path2: str) -> None:
        path1, path2 = self._strip_protocol(path1), self._strip_protocol(path2)
        await self.client().rename(path1, path2)
        self.invalidate_cache(path1)
        self.invalidate_cache(path2)

    def mv(
        self,
        path1: str,
        path2: str,
        recursive: bool = False,
        maxdepth: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Move a file (copy, then delete: not atomic on object stores); trees as fsspec does."""
        if isinstance(path1, str) and isinstance(path2, str) and self.isfile(path1):
            sync(self.loop, self._mv_file, path1, path2)
            return
        super().mv(path1, path2, recursive=recursive, maxdepth=maxdepth, **kwargs)

    async def _mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        await self.client().mkdir(self._strip_protocol(path))

    async def _makedirs(self, path: str, exist_ok: bool = False) -> None:
        await self.client().mkdir(self._strip_protocol(path))


class DepotWriteFile(io.RawIOBase):
    """A file open for writing, whose whole content is written on ``close``; readers see the
    new content after ``close`` returns.

    Where the path's owner worker runs on this node and the mount is ``write-back``, the bytes
    go straight into the worker's staging file and ``close`` fsyncs and commits it (a local
    write, docs/writes.md); otherwise they go to a spool (memory, then a temporary file) that
    ``close`` uploads to the owner."""

    def __init__(self, fs: DepotFileSystem, path: str) -> None:
        super().__init__()
        if fs.loop is None:
            raise NotImplementedError("open files need a filesystem with a running loop thread")
        self.fs = fs
        self.path = path
        self.mode = "wb"
        self._local: LocalWrite | None = fs._run(self._open_local())
        self._spool: Any = (
            None
            if self._local is not None
            else tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024)  # noqa: SIM115
        )
        self._discard = False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        if self._local is not None:
            return self._local.write(data)
        view = memoryview(data).cast("B")
        self._spool.write(view)
        return view.nbytes

    def tell(self) -> int:
        if self._local is not None:
            return self._local.size
        return int(self._spool.tell())

    async def _open_local(self) -> LocalWrite | None:
        return await self.fs.client().open_local_write(self.path)

    async def _upload(self) -> None:
        await self.fs.client().write(self.path, self._spool)

    def discard(self) -> None:
        """Close without writing anything."""
        self._discard = True
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        local = self._local
        try:
            if local is not None:
                if self._discard:
                    self.fs._run(local.abort())
                else:
                    try:
                        local.finish()  # flush + fsync here, in the writer's thread
                        self.fs._run(local.commit())
                    except BaseException:
                        self.fs._run(local.abort())
                        raise
                    self.fs.invalidate_cache(self.path)
            elif not self._discard:
                self._spool.seek(0)
                self.fs._run(self._upload())
                self.fs.invalidate_cache(self.path)
        finally:
            if self._spool is not None:
                self._spool.close()
            super().close()

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is not None:
            self._discard = True  # an exception inside ``with``: leave the old file in place
        self.close()


class _Block:
    """One read-ahead block being filled with ``[start, end)`` on the IO loop.

    A pooled block's buffer goes back to the pool exactly once, by whichever of the fetch
    (finishing) and the file (dropping the block) comes second, so a buffer is never reused while
    still being written. A block made for a read of exactly its extent (``pool`` None) is a new
    result object instead, handed to that read without a copy.
    """

    __slots__ = ("_dropped", "_finished", "_lock", "buf", "end", "future", "pool", "start", "view")

    def __init__(self, start: int, end: int, pool: BufferPool | None) -> None:
        self.start = start
        self.end = end
        self.pool = pool
        self.buf: bytes | bytearray
        if pool is not None:
            self.buf = pool.take()
            self.view = memoryview(self.buf)[: end - start]
        else:
            self.buf, self.view = alloc_result(end - start)
        self.future: concurrent.futures.Future[int] | None = None
        self._lock = threading.Lock()
        self._finished = False
        self._dropped = False

    def finished(self) -> None:
        with self._lock:
            self._finished = True
            give = self._dropped
        if give:
            self._give_back()

    def drop(self) -> None:
        if self.future is not None and not self.future.done():
            self.future.cancel()
        with self._lock:
            self._dropped = True
            give = self._finished
        if give:
            self._give_back()

    def _give_back(self) -> None:
        if self.pool is not None and isinstance(self.buf, bytearray):
            self.pool.give(self.buf)


class DepotFile(AbstractBufferedFile):  # type: ignore[misc]
    """A read-only file of the namespace, pinned to the version seen at open."""

    def __init__(
        self,
        fs: DepotFileSystem,
        path: str,
        mode: str = "rb",
        block_size: int | str | None = None,
        cache_options: dict[str, Any] | None = None,
        size: int | None = None,
        read_ahead: int | str | None = None,
        **kwargs: Any,
    ) -> None:
        if fs.loop is None:
            raise NotImplementedError("open files need a filesystem with a running loop thread")
        kwargs.pop("cache_type", None)
        kwargs.pop("autocommit", None)
        info = fs.info(path)
        if info["type"] == "directory":
            raise IsADirectory("is a directory", info["name"])
        super().__init__(
            fs,
            info["name"],
            mode="rb",
            block_size=block_size or "default",
            cache_type="none",
            cache_options=cache_options,
            size=info["size"],
            **kwargs,
        )
        self.details = info
        self.fs: DepotFileSystem = fs
        self.status = _status(info)
        #: The entity tag every read of this file sends as ``If-Match``.
        self.version = version_of(self.status)
        options = cache_options or {}
        ahead = options.get("read_ahead", read_ahead)
        self.read_ahead = fs.read_ahead if ahead is None else parse_size(ahead)
        self._blocks: dict[int, _Block] = {}
        self._block_size = 0
        # Read-ahead blocks sized to the caller's reads, each handed over whole (see _read_ahead).
        self._whole_blocks = False
        self._last_start = -1
        self._last_end = -1
        fs.prefetch_on_open(self.path, self.status)

    # reading ---------------------------------------------------------------------------------------
    def read(self, length: int | None = -1) -> bytes:
        """Up to ``length`` bytes from the current position (all remaining bytes by default)."""
        self._check_readable()
        start = self.loc
        stop = self.size if length is None or length < 0 else min(self.size, start + length)
        if stop <= start:
            return b""
        data = self._read(start, stop, None)
        assert isinstance(data, bytes)
        self.loc += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        """Read into ``buffer`` (large reads land there directly, without a copy)."""
        self._check_readable()
        out = memoryview(buffer).cast("B")
        start = self.loc
        stop = min(self.size, start + out.nbytes)
        if stop <= start:
            return 0
        count = self._read(start, stop, out)
        assert isinstance(count, int)
        self.loc += count
        return count

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self.fs._run(self._fetch(start, end))

    async def _fetch(self, start: int, end: int) -> bytes:
        return await self.fs.client().read_range(
            self.path, start, end, version=self.version, size=self.size
        )

    async def _fetch_into(self, start: int, end: int, out: memoryview) -> int:
        return await self.fs.client().read_range_into(
            self.path, start, end, out, version=self.version
        )

    def _check_readable(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file.")

    def _read(self, start: int, stop: int, out: memoryview | None) -> bytes | int:
        sequential = self._last_start <= start <= self._last_end
        self._last_start, self._last_end = start, stop
        if self._blocks:
            # Blocks wholly before this read are consumed; after a jump, so are far-away ones.
            horizon = stop + self.read_ahead
            self._drop_blocks(lambda b: b.end <= start or (not sequential and b.start >= horizon))
        if sequential and self.read_ahead > 0:
            self._read_ahead(start, stop)
        pieces: list[bytes | memoryview] = []
        filled = 0
        pos = start
        while pos < stop:
            block = self._blocks.get(pos // self._block_size) if self._blocks else None
            if block is not None:
                count = self._wait(block)
                if (
                    block.pool is None and out is None and pos == start == block.start
                    and stop == block.end == block.start + count
                ):
                    del self._blocks[block.start // self._block_size]
                    return finish_result(block.buf, block.view, count)
                hi = min(stop, block.start + count)
                if hi <= pos:
                    break  # the file ended early
                piece: bytes | memoryview = block.view[pos - block.start : hi - block.start]
            else:
                hi = self._direct_end(pos, stop)
                if out is not None:
                    want = hi - pos
                    dest = out[filled : filled + want]
                    got = self._read_now(pos, hi, dest)
                    if got is None:
                        got = self.fs._run(self._fetch_into(pos, hi, dest))
                    filled += got
                    pos += got
                    if got < want:
                        break
                    continue
                piece = self._read_result(pos, hi)
                hi = pos + len(piece)
                if hi == pos:
                    break
            if out is not None:
                out[filled : filled + len(piece)] = piece
                filled += len(piece)
            else:
                pieces.append(piece)
            pos = hi
        if out is not None:
            return filled
        if len(pieces) == 1 and isinstance(pieces[0], bytes):
            return pieces[0]
        return b"".join(pieces)

    def _short_circuit(self) -> ShortCircuit | None:
        client = self.fs.client_now()
        return client.short_circuit if client is not None else None

    def _read_now(self, start: int, stop: int, dest: memoryview) -> int | None:
        """Bytes read in this thread, or None (then the event loop serves the read)."""
        return self.fs.read_now(self.path, start, stop, dest, self.version)

    def _read_result(self, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` as a new result, made in this thread whoever fills it.

        Made on the loop thread, a large result came from that thread's own malloc heap, which
        glibc unmaps whenever it empties: every 8 MiB read the loop served (a cold page that a
        local reader had the worker fill) faulted in fresh memory, about a seventh of the CPU
        of eight such readers (docs/benchmarks.md, tenth look). This thread's heap keeps freed
        blocks (``large_results``).
        """
        fs = self.fs
        fs.large_results(stop - start)
        result, view = alloc_result(stop - start)
        count = self._read_now(start, stop, view)
        if count is None:
            count = fs._run(self._fetch_into(start, stop, view))
        return finish_result(result, view, count)

    def _direct_end(self, pos: int, stop: int) -> int:
        """Where a direct fetch from ``pos`` should stop: ``stop`` or the next read-ahead block."""
        if not self._blocks:
            return stop
        size = self._block_size
        for index in range(pos // size + 1, (stop - 1) // size + 1):
            if index in self._blocks:
                return index * size
        return stop

    def _read_ahead(self, start: int, stop: int) -> None:
        """Keep blocks in flight for the window after this read (and this read, if small).

        Not for reads of a block or more from a local worker's page files (short-circuit):
        those are as fast as the copy a read-ahead block would add, so they go straight into
        the caller's buffer. Small local reads keep it: one block then serves many of them
        without a trip to the event loop each.

        A file read in equal, aligned chunks of whole blocks (``read(8 MiB)`` loops) gets blocks
        of that size, each a new result object: the next read is handed its block as is, where
        joining pooled blocks would copy every byte once more.
        """
        base = self.fs._block_size or self.fs._run(self.fs._read_block_size())
        length = stop - start
        if length >= base:
            short_circuit = self._short_circuit()
            if short_circuit is not None and short_circuit.is_local(self.path, stop):
                return
        if not self._blocks:
            self._whole_blocks = (
                length >= base and length % base == 0 and start % length == 0
                and length <= _WHOLE_BLOCK_MAX
            )
            self._block_size = length if self._whole_blocks else base
            if self._whole_blocks:
                self.fs.large_results(length)
        size = self._block_size
        pool = None if self._whole_blocks else self.fs.buffers(size)
        first = start if length < size else stop
        last = min(self.size, stop + max(self.read_ahead, size if self._whole_blocks else 0))
        threads = self.fs.block_threads()
        for index in range(first // size, (last - 1) // size + 1 if last > first else 0):
            if index in self._blocks:
                continue
            block = _Block(index * size, min(self.size, (index + 1) * size), pool)
            if threads is not None:
                block.future = threads.submit(self._fill_now, block)
            else:
                block.future = asyncio.run_coroutine_threadsafe(self._fill(block), self.fs.loop)
            self._blocks[index] = block

    async def _fill(self, block: _Block) -> int:
        try:
            return await self._fetch_into(block.start, block.end, block.view)
        finally:
            block.finished()

    def _fill_now(self, block: _Block) -> int:
        """Receive a block on a blocking connection in a read-ahead thread: a hot block then
        costs no event loop work on this side (docs/fsspec.md); else the loop fetches it."""
        try:
            count = self.fs.read_now(
                self.path, block.start, block.end, block.view, self.version, any_size=True
            )
            if count is None:
                count = asyncio.run_coroutine_threadsafe(
                    self._fetch_into(block.start, block.end, block.view), self.fs.loop
                ).result()
            return count
        finally:
            block.finished()

    def _wait(self, block: _Block) -> int:
        assert block.future is not None
        try:
            return block.future.result()
        except BaseException:
            self._blocks.pop(block.start // self._block_size, None)
            block.drop()
            raise

    def _drop_blocks(self, predicate: Any) -> None:
        for index, block in list(self._blocks.items()):
            if predicate(block):
                del self._blocks[index]
                block.drop()

    def close(self) -> None:
        if self._blocks:
            self._drop_blocks(lambda b: True)
        super().close()

    def readuntil(self, char: bytes = b"\n", blocks: int | None = None) -> bytes:
        """Read up to and including ``char``, probing 64 KiB at a time (not a whole block)."""
        return bytes(super().readuntil(char, blocks or min(self.blocksize, 64 * 1024)))

    def write(self, data: Any) -> int:
        raise ReadOnlyFileSystem(_READ_ONLY, self.path)
