"""Prefetch on open: a file its mount marks (``prefetch_on_open``) is pulled whole into the cache
as soon as a client opens it for reading (docs/configuration.md#prefetch-on-open).

A model server that opens ``model.safetensors`` and page-faults through it via ``mmap`` reads
in small random pieces that read-ahead never follows; instead, at open, every placement segment
of the file is asked of its owner worker with the route a ``depot load`` job uses for its steps
(``POST /api/v1/cache/load``): one request per owner naming all of that owner's segments, which
the owner fills in parallel from the under store (its single flight shares each page fetch with
the reads that arrive meanwhile). A page already cached costs the owner one index lookup, so a
file already in the cache costs one cheap request per owner.

It never delays the open nor fails a read: it runs in a task of its own and its errors are
logged at debug level. Opens of the same version of a file by this client within ``window``
seconds (another process's reopen through a FUSE mount, a loader opening it again) start
nothing. Routing is the reader's: the replica this client reads from (``replication``), with
the next worker of the key when the owner refused the connection; never the under store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from depot.client.routing import UNREACHABLE, WorkerRouter
from depot.core.config import DepotConfig, MountConfig
from depot.core.errors import DepotError
from depot.core.transport import (
    ConnectionPool,
    WorkerUnreachable,
    error_from_response,
    parse_endpoint,
    path_query,
)
from depot.core.types import FileStatus

log = logging.getLogger(__name__)

LOAD = "/api/v1/cache/load"
#: Seconds during which an open of a version this client prefetched starts nothing again.
PREFETCH_WINDOW = 60.0
#: Longest silence of a load request: a cold owner answers only once its segments are loaded.
PREFETCH_TIMEOUT = 600.0
#: Ranges one load request names at most (the worker takes up to 1024).
MAX_RANGES = 512
#: Workers of a key a prefetch tries (the owner, then the next one), as reads do.
FAILOVER_WORKERS = 2
#: Versions remembered for deduplication before expired ones are dropped.
_REMEMBER = 4096

# (start, end, further workers to try) of one placement segment.
_Item = tuple[int, int, tuple[str, ...]]
_COUNTS = ("pages", "cached_before", "loaded", "cached", "bytes_from_ufs")


def _mount_key(path: str) -> str:
    return path.rstrip("/") or "/"


def _merged(items: list[_Item]) -> list[tuple[int, int]]:
    """The byte ranges of ``items``, adjacent ones joined."""
    spans: list[tuple[int, int]] = []
    for start, end, _ in sorted(items):
        if spans and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return spans


class OpenPrefetcher:
    """Starts, deduplicates and counts the prefetches of one ``CacheClient`` (one event loop)."""

    def __init__(
        self,
        router: WorkerRouter,
        config: DepotConfig,
        stat: Callable[[str], Awaitable[FileStatus]],
    ) -> None:
        self.router = router
        self.config = config
        self._stat = stat
        self.window = PREFETCH_WINDOW
        self._recent: dict[tuple[str, str], float] = {}
        self._tasks: dict[tuple[str, str] | str, asyncio.Task[None]] = {}
        self._pools: dict[str, ConnectionPool] = {}
        self._rules: tuple[object, dict[str, MountConfig]] | None = None
        self._closed = False
        #: ``triggered``: prefetches started; ``deduplicated``: opens of a marked file that
        #: started none (one of its version ran within the window); ``completed`` / ``failed``;
        #: ``requests``: load requests sent; the page counts and UFS bytes the owners reported.
        self.stats: dict[str, int] = {
            "triggered": 0,
            "deduplicated": 0,
            "completed": 0,
            "failed": 0,
            "requests": 0,
            "pages": 0,
            "pages_cached_before": 0,
            "pages_loaded": 0,
            "bytes_from_ufs": 0,
        }

    # which files --------------------------------------------------------------------------------
    def mount_of(self, path: str) -> MountConfig | None:
        """The mount settings that decide for ``path``: the cluster's mounts (its view), where
        this client's own config sets ``prefetch_on_open`` for the same mount path, its own."""
        view = self.router.view
        served = view.mounts if view is not None else ()
        rules = self._rules
        if rules is None or rules[0] is not served:
            by_path = {_mount_key(m.path): m for m in served}
            for mount in self.config.mounts:
                key = _mount_key(mount.path)
                if key not in by_path or "prefetch_on_open" in mount.model_fields_set:
                    by_path[key] = mount
            rules = self._rules = (served, by_path)
        by_path = rules[1]
        probe = _mount_key(path)
        while True:
            found = by_path.get(probe)
            if found is not None or probe == "/":
                return found
            probe = probe[: probe.rfind("/")] or "/"

    def wanted(self, path: str) -> bool:
        """Whether an open of ``path`` prefetches it (its mount's ``prefetch_on_open``)."""
        mount = self.mount_of(path)
        return mount is not None and mount.prefetches(path)

    # starting -----------------------------------------------------------------------------------
    def on_open(self, path: str, status: FileStatus | None = None) -> bool:
        """A file was opened for reading: start its prefetch in the background when its mount
        marks it and no prefetch of this version started within the window. Returns whether
        one started (``status`` None: its stat runs in the background first). Never raises,
        never waits; call it on the client's event loop."""
        try:
            if self._closed or not self.wanted(path):
                return False
            if status is None:
                self._spawn(path, self._stat_then_open(path))
                return True
            if status.is_dir:
                return False
            key = (status.path or path, status.entity_tag)
            now = time.monotonic()
            running = self._tasks.get(key)
            if (running is not None and not running.done()) or (
                now - self._recent.get(key, float("-inf")) < self.window
            ):
                self.stats["deduplicated"] += 1
                return False
            self._remember(key, now)
            self.stats["triggered"] += 1
            self._spawn(key, self._run(path, status))
            return True
        except Exception as exc:  # an open never fails because of its prefetch
            log.debug("prefetch on open of %s not started: %s", path, exc)
            return False

    def _remember(self, key: tuple[str, str], now: float) -> None:
        recent = self._recent
        if len(recent) >= _REMEMBER:
            for old in [k for k, at in recent.items() if now - at >= self.window]:
                del recent[old]
            if len(recent) >= _REMEMBER:
                recent.pop(next(iter(recent)))
        recent[key] = now

    def _spawn(self, key: tuple[str, str] | str, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks[key] = task

        def done(finished: asyncio.Task[None]) -> None:
            if self._tasks.get(key) is finished:
                del self._tasks[key]

        task.add_done_callback(done)

    async def _stat_then_open(self, path: str) -> None:
        try:
            status = await self._stat(path)
        except (DepotError, OSError) as exc:
            log.debug("prefetch on open of %s: stat failed: %s", path, exc)
            return
        self.on_open(path, status)

    async def _run(self, path: str, status: FileStatus) -> None:
        started = time.monotonic()
        try:
            result = await self.load(path, status)
        except (DepotError, OSError) as exc:
            self.stats["failed"] += 1
            log.debug("prefetch on open of %s failed: %s", path, exc)
            return
        except Exception:  # a bug must not go unseen, nor reach the reader
            self.stats["failed"] += 1
            log.debug("prefetch on open of %s failed", path, exc_info=True)
            return
        self.stats["completed"] += 1
        log.debug(
            "prefetch on open of %s: %d page(s), %d loaded, %d cached before, in %.2fs",
            path, result["pages"], result["loaded"], result["cached_before"],
            time.monotonic() - started,
        )

    # loading ------------------------------------------------------------------------------------
    async def load(self, path: str, status: FileStatus) -> dict[str, int]:
        """Load every page of the file into the cache of its owners and wait for it; returns
        the owners' page counts summed. Raises the first error after every owner answered."""
        totals = dict.fromkeys(_COUNTS, 0)
        size = status.size
        if status.is_dir or size <= 0:
            return totals
        router = self.router
        await router.current_view()
        plan: dict[str, list[_Item]] = {}
        pos = 0
        while pos < size:
            end = min(size, router.segment_end(pos) or size)
            targets = router.targets(path, pos)[:FAILOVER_WORKERS]
            plan.setdefault(targets[0], []).append((pos, end, tuple(targets[1:])))
            pos = end
        errors: list[BaseException] = []

        async def owner(endpoint: str, items: list[_Item]) -> None:
            try:
                result = await self._send(endpoint, path, _merged(items))
            except UNREACHABLE as exc:
                if exc.connect_failed:
                    router.failed(endpoint, exc)
                rest: dict[str, list[_Item]] = {}
                for start, end, further in items:
                    if further:
                        rest.setdefault(further[0], []).append((start, end, further[1:]))
                if sum(len(i) for i in rest.values()) < len(items):
                    errors.append(exc)  # segments with no worker left to ask
                await asyncio.gather(*(owner(e, i) for e, i in rest.items()))
                return
            except (DepotError, OSError) as exc:
                errors.append(exc)
                return
            for key in _COUNTS:
                totals[key] += result.get(key, 0)

        await asyncio.gather(*(owner(e, i) for e, i in plan.items()))
        stats = self.stats
        stats["pages"] += totals["pages"]
        stats["pages_cached_before"] += totals["cached_before"]
        stats["pages_loaded"] += totals["loaded"]
        stats["bytes_from_ufs"] += totals["bytes_from_ufs"]
        if errors:
            raise errors[0]
        return totals

    async def _send(
        self, endpoint: str, path: str, spans: list[tuple[int, int]]
    ) -> dict[str, int]:
        """Ask ``endpoint`` to load ``spans`` of ``path``: one request (per ``MAX_RANGES``)."""
        totals = dict.fromkeys(_COUNTS, 0)
        pool = self._pool(endpoint)
        for first in range(0, len(spans), MAX_RANGES):
            batch = spans[first : first + MAX_RANGES]
            target = path_query(LOAD, path)
            if len(batch) == 1:
                target += f"&start={batch[0][0]}&end={batch[0][1]}"
            else:
                target += "&ranges=" + ",".join(f"{a}-{b}" for a, b in batch)
            self.stats["requests"] += 1
            response = await pool.request(target, method="POST")
            if response.status >= 300:
                raise error_from_response(response, path)
            data = response.json()
            if not isinstance(data, dict):
                raise WorkerUnreachable(f"worker {endpoint} sent a malformed load answer")
            for key in _COUNTS:
                value = data.get(key)
                if isinstance(value, int):
                    totals[key] += value
        return totals

    def _pool(self, endpoint: str) -> ConnectionPool:
        """Connections of their own: a load answers only when done, which may take minutes."""
        pool = self._pools.get(endpoint)
        if pool is None:
            settings = self.config.client
            pool = self._pools[endpoint] = ConnectionPool(
                parse_endpoint(endpoint),
                max_connections=4,
                connect_timeout=settings.connect_timeout,
                timeout=max(settings.timeout, PREFETCH_TIMEOUT),
            )
        return pool

    async def close(self) -> None:
        """Stop the prefetches in flight (their loads stop on the workers) and the pools."""
        self._closed = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


__all__ = ["PREFETCH_WINDOW", "OpenPrefetcher"]
