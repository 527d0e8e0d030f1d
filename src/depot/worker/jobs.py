"""Distributed preload (``load``) and ``free`` jobs, coordinated by the worker that receives them.

A job is a JSON document at ``jobs/<id>`` in the cluster store (etcd, or the node's own store), so
any worker or CLI can report its progress. The worker that creates a job coordinates it:

* ``load`` walks the path (a file, one directory level, or with ``recursive`` the whole tree),
  cuts every file at its placement segments (and into requests of at most ``LOAD_UNIT`` bytes),
  and asks the owner of each piece on the ring to load those pages into its cache
  (``POST /api/v1/cache/load``; itself directly). Up to ``concurrency`` requests run at once,
  under an optional bandwidth limit. ``metadata_only`` only warms the owners' metadata caches
  (``stat`` of every file and ``list`` of every directory, on their owners). ``verify`` then
  checks every page on its owner (read back, checksums verified) and loads what is missing.
* ``free`` asks every live worker to drop the cached pages and metadata of the path.

Failures: a transient error (worker unreachable or timed out, store unavailable or throttling, a
file that changed while loading) is retried with backoff for ``retry_for`` seconds, routing again
on the fresh view each time, so a dead owner's keys move on once it leaves the ring and a
restarted owner takes them back. A permanent error (no such file, permission denied, ...) is
recorded for that file and the job goes on. Only a failure of the job's own path fails the job.

Ownership: the coordinator holds an ephemeral claim ``job-claims/<id>``; progress is written
about once a second; ``job-active/<id>`` lists the jobs not finished. A worker that starts
resumes the active jobs it coordinated; any worker adopts an active job whose claim is gone and
whose document has not moved for ``stale_after`` seconds (its coordinator died). A resumed job
walks its path again: pages already cached cost a lookup only. ``stop`` writes
``job-stops/<id>``; the coordinator sees it within a second. Only the coordinator writes
``jobs/<id>``, so no write of the document races another.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from depot.core.errors import (
    DepotError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from depot.core.transport import ConnectionPool, error_from_response, parse_endpoint
from depot.core.types import FileStatus, parse_rate
from depot.namespace.paths import normalize_path
from depot.placement.membership import ClusterStore, WorkerInfo, check_kv_key, check_kv_value
from depot.placement.view import ClusterView
from depot.worker.service import ReadThroughService

log = logging.getLogger(__name__)

JOBS_PREFIX = "jobs/"
CLAIMS_PREFIX = "job-claims/"
STOPS_PREFIX = "job-stops/"
ACTIVE_PREFIX = "job-active/"

QUEUED = "queued"
RUNNING = "running"
STOPPING = "stopping"
STOPPED = "stopped"
COMPLETED = "completed"
FAILED = "failed"
ACTIVE = frozenset({QUEUED, RUNNING, STOPPING})
FINISHED = frozenset({STOPPED, COMPLETED, FAILED})
KINDS = ("load", "free")

LOAD_UNIT = 64 * 1024 * 1024
"""Largest range of one load request (cut at page and segment boundaries)."""
MAX_FAILURES = 100
"""Failures listed in a job document; more are only counted."""
MAX_FINISHED_JOBS = 200
"""Finished jobs kept in the store; older ones are deleted when a new job is created."""
_REASON_CHARS = 300
_ID_RE = re.compile(r"[0-9a-f]{6,32}")

LOAD_ROUTE = "/api/v1/cache/load"
FREE_ROUTE = "/api/v1/cache/free"


# --- options ---------------------------------------------------------------------------------


def parse_bool(name: str, value: str | bool | None, default: bool = False) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise InvalidArgument(f"{name} must be true or false, got {value!r}")


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What a job does; stored in its document under ``options``."""

    kind: str
    path: str
    recursive: bool = False
    verify: bool = False
    metadata_only: bool = False
    bandwidth: int | None = None
    concurrency: int = 32

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgument(f"unknown job kind {self.kind!r} (use load or free)")
        if not 1 <= self.concurrency <= 1024:
            raise InvalidArgument(f"concurrency must be 1..1024, got {self.concurrency}")
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise InvalidArgument(f"bandwidth must be positive, got {self.bandwidth}")
        object.__setattr__(self, "path", normalize_path(self.path))

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> JobSpec:
        """From the query parameters of ``POST /api/v1/jobs``."""
        known = {"kind", "path", "recursive", "verify", "metadata_only", "bandwidth",
                 "concurrency"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise InvalidArgument(f"unknown job parameter {unknown[0]!r}")
        path = params.get("path")
        if not path:
            raise InvalidArgument("missing query parameter 'path'")
        concurrency = params.get("concurrency", "32")
        if not concurrency.isdigit():
            raise InvalidArgument(f"concurrency must be a number, got {concurrency!r}")
        return cls(
            kind=params.get("kind", "load"),
            path=path,
            recursive=parse_bool("recursive", params.get("recursive")),
            verify=parse_bool("verify", params.get("verify")),
            metadata_only=parse_bool("metadata_only", params.get("metadata_only")),
            bandwidth=parse_rate(params.get("bandwidth")),
            concurrency=int(concurrency),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "recursive": self.recursive,
            "verify": self.verify,
            "metadata_only": self.metadata_only,
            "bandwidth": self.bandwidth,
            "concurrency": self.concurrency,
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> JobSpec:
        opts = doc.get("options") or {}
        return cls(
            kind=str(doc["kind"]),
            path=str(doc["path"]),
            recursive=bool(opts.get("recursive", False)),
            verify=bool(opts.get("verify", False)),
            metadata_only=bool(opts.get("metadata_only", False)),
            bandwidth=opts.get("bandwidth") or None,
            concurrency=int(opts.get("concurrency", 32)),
        )


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not _ID_RE.fullmatch(job_id):
        raise InvalidArgument(f"invalid job id {job_id!r}")
    return job_id


def _new_doc(job_id: str, spec: JobSpec, worker_id: str, endpoint: str) -> dict[str, Any]:
    now = time.time()
    return {
        "id": job_id,
        "kind": spec.kind,
        "path": spec.path,
        "options": spec.to_dict(),
        "state": QUEUED,
        "phase": "queued",
        "coordinator": worker_id,
        "coordinator_endpoint": endpoint,
        "created": now,
        "started": None,
        "updated": now,
        "finished": None,
        "attempts": 0,
        "walk_done": False,
        "files": {"total": 0, "done": 0, "failed": 0},
        "bytes": {"total": 0, "done": 0, "from_ufs": 0, "cached_before": 0},
        "segments": {"total": 0, "done": 0},
        "pages": {"total": 0, "cached_before": 0, "loaded": 0, "not_cached": 0},
        "verify": None,
        "workers": None,
        "freed": None,
        "retries": 0,
        "rate": 0.0,
        "eta": None,
        "elapsed": 0.0,
        "failures": [],
        "failures_omitted": 0,
        "error": None,
    }


def _encode(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _decode(data: bytes | None) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


# --- a store for one node -----------------------------------------------------------------


class FileJobStore(ClusterStore):
    """Job state of a node whose membership has no shared store (a single node, a static list).

    One file per key under ``root`` (written atomically), so a restarted worker finds the jobs it
    was running and resumes them. Ephemeral keys live in memory only: they vanish with the process.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._ephemeral: dict[str, bytes] = {}

    def _file(self, key: str) -> Path:
        return self.root / (quote(check_kv_key(key), safe="") + ".json")

    async def kv_get(self, key: str) -> bytes | None:
        if key in self._ephemeral:
            return self._ephemeral[key]
        try:
            return self._file(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise Unavailable(f"cannot read job store: {exc}", str(self.root)) from None

    async def kv_put(self, key: str, value: bytes, *, ephemeral: bool = False) -> None:
        data = check_kv_value(value)
        target = self._file(key)
        if ephemeral:
            self._ephemeral[key] = data
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        except OSError as exc:
            raise Unavailable(f"cannot write job store: {exc}", str(self.root)) from None

    async def kv_create(self, key: str, value: bytes, *, ephemeral: bool = False) -> bool:
        if key in self._ephemeral or self._file(key).exists():
            return False
        await self.kv_put(key, value, ephemeral=ephemeral)
        return True

    async def kv_delete(self, key: str) -> bool:
        if self._ephemeral.pop(key, None) is not None:
            return True
        try:
            self._file(key).unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise Unavailable(f"cannot write job store: {exc}", str(self.root)) from None

    async def kv_list(self, prefix: str = "") -> dict[str, bytes]:
        out = {k: v for k, v in self._ephemeral.items() if k.startswith(prefix)}
        try:
            names = [p.name for p in self.root.iterdir()]
        except FileNotFoundError:
            names = []
        for name in names:
            if name.startswith(".") or not name.endswith(".json"):
                continue
            key = unquote(name[: -len(".json")])
            if key.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    out[key] = (self.root / name).read_bytes()
        return dict(sorted(out.items()))


# --- pacing ------------------------------------------------------------------------------------


class Pacer:
    """A token bucket on bytes: ``take(n)`` sleeps so the average stays at ``rate`` bytes/s."""

    def __init__(self, rate: float, burst: float = 0.25) -> None:
        self.rate = rate
        self.burst = burst  # seconds of credit that may build up while idle
        self.next_free = time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        start = max(now - self.burst, self.next_free)
        self.next_free = start + n / self.rate
        delay = self.next_free - now
        if delay > 0:
            await asyncio.sleep(delay)

    def refund(self, n: int) -> None:
        """Give back bytes taken but not transferred (pages that were cached already)."""
        if n > 0:
            self.next_free = max(time.monotonic() - self.burst, self.next_free - n / self.rate)


# --- one job run -------------------------------------------------------------------------------


@dataclass(slots=True)
class _File:
    path: str
    size: int
    segments_left: dict[int, int] = field(default_factory=dict)  # segment -> units left
    units_left: int = 0
    failed: bool = False


@dataclass(frozen=True, slots=True)
class _Unit:
    kind: str  # load | stat | list
    path: str
    file_key: str | None
    start: int = 0
    end: int = 0
    segment: int = 0
    file: _File | None = None
    verify: bool = False

    @property
    def length(self) -> int:
        return self.end - self.start


class _Stop(Exception):
    """The job was asked to stop."""


class _Run:
    """One attempt at running a job on this worker (a resumed job gets a new one)."""

    def __init__(self, runner: JobRunner, doc: dict[str, Any]) -> None:
        self.runner = runner
        self.spec = JobSpec.from_doc(doc)
        self.doc = doc
        self.stop_requested = False
        self.task: asyncio.Task[None] | None = None
        self._body: asyncio.Future[None] | None = None
        self._t0 = time.monotonic()
        self._pacer = Pacer(self.spec.bandwidth) if self.spec.bandwidth else None
        self._done_files: list[tuple[str, int]] = []  # for the verify pass
        self._failed_paths: set[str] = set()

    # documents -------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        doc = self.doc
        elapsed = time.monotonic() - self._t0 if doc["started"] else 0.0
        doc["elapsed"] = round(elapsed, 3)
        doc["updated"] = time.time()
        done = doc["bytes"]["done"]
        rate = done / elapsed if elapsed > 0 else 0.0
        doc["rate"] = round(rate, 1)
        left = doc["bytes"]["total"] - done
        doc["eta"] = (
            round(left / rate, 1) if doc["walk_done"] and rate > 0 and doc["state"] == RUNNING
            else (0.0 if doc["state"] in FINISHED else None)
        )
        out = copy.deepcopy(doc)  # the counters keep moving; callers get a snapshot
        if self.stop_requested and doc["state"] in (QUEUED, RUNNING):
            out["state"] = STOPPING
        return out

    def fail(self, path: str, error: BaseException) -> None:
        if path in self._failed_paths:
            return
        self._failed_paths.add(path)
        failures: list[dict[str, Any]] = self.doc["failures"]
        if len(failures) >= MAX_FAILURES:
            self.doc["failures_omitted"] += 1
            return
        if isinstance(error, DepotError):
            code, reason = error.code, error.message
        elif isinstance(error, OSError):
            code, reason = "OSError", error.strerror or str(error)
        else:
            code, reason = type(error).__name__, str(error)
        failures.append({"path": path, "code": code, "reason": reason[:_REASON_CHARS]})

    # the run ---------------------------------------------------------------------------------
    async def run(self) -> None:
        runner = self.runner
        doc = self.doc
        job_id = doc["id"]
        try:
            async with runner.slots:
                if await runner.stop_flag(job_id):
                    self.stop_requested = True
                doc.update(state=RUNNING, phase="walk", started=time.time(), finished=None,
                           attempts=doc["attempts"] + 1, error=None)
                self._reset_counters()
                self._t0 = time.monotonic()
                await runner.write(self.snapshot())
                flusher = asyncio.ensure_future(self._flush_loop())
                try:
                    self._body = asyncio.ensure_future(self._execute())
                    try:
                        await self._body
                    except (_Stop, asyncio.CancelledError):
                        current = asyncio.current_task()
                        if current is not None and current.cancelling():
                            raise  # the worker is shutting down: the job stays active
                        if not self.stop_requested:
                            raise
                        doc.update(state=STOPPED, phase="stopped")
                    else:
                        doc.update(state=COMPLETED, phase="done")
                finally:
                    flusher.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await flusher
        except asyncio.CancelledError:
            with contextlib.suppress(DepotError):
                await asyncio.shield(runner.write(self.snapshot()))
            raise
        except Exception as exc:
            error = _leaf(exc)  # task groups wrap what their bodies raise
            if isinstance(error, DepotError):
                doc.update(state=FAILED, phase="failed",
                           error={"code": error.code, "reason": str(error)[:_REASON_CHARS]})
            else:  # a bug: fail the job with what happened, log the trace
                log.exception("job %s failed", job_id)
                doc.update(state=FAILED, phase="failed",
                           error={"code": "InternalError", "reason": repr(error)[:_REASON_CHARS]})
        doc["finished"] = time.time()
        final = self.snapshot()
        final["state"] = doc["state"]
        await runner.finish(job_id, final)

    def _reset_counters(self) -> None:
        fresh = _new_doc(self.doc["id"], self.spec, "", "")
        for key in ("files", "bytes", "segments", "pages", "verify", "workers", "freed",
                    "failures", "failures_omitted", "retries", "walk_done"):
            self.doc[key] = fresh[key]
        self._done_files.clear()
        self._failed_paths.clear()

    async def _flush_loop(self) -> None:
        runner = self.runner
        while True:
            await asyncio.sleep(runner.flush_interval)
            if not self.stop_requested and await runner.stop_flag(self.doc["id"]):
                self.request_stop()
            with contextlib.suppress(DepotError):
                await runner.write(self.snapshot())

    def request_stop(self) -> None:
        self.stop_requested = True
        if self._body is not None and not self._body.done():
            self._body.cancel()

    async def _execute(self) -> None:
        if self.stop_requested:
            raise _Stop()
        if self.spec.kind == "free":
            await self._free()
        else:
            await self._load()

    # load ------------------------------------------------------------------------------------
    async def _load(self) -> None:
        spec = self.spec
        queue: asyncio.Queue[_Unit | None] = asyncio.Queue(maxsize=4 * spec.concurrency)
        async with asyncio.TaskGroup() as tg:
            consumers = [tg.create_task(self._consume(queue)) for _ in range(spec.concurrency)]
            try:
                await self._walk(queue)
            except BaseException:
                for consumer in consumers:
                    consumer.cancel()
                raise
            self.doc["walk_done"] = True
            self.doc["phase"] = "load"
            for _ in consumers:
                await queue.put(None)
        if spec.verify and not spec.metadata_only:
            await self._verify()

    async def _verify(self) -> None:
        spec = self.spec
        self.doc["phase"] = "verify"
        self.doc["verify"] = {"files": 0, "pages": 0, "missing": 0, "loaded": 0, "not_cached": 0}
        queue: asyncio.Queue[_Unit | None] = asyncio.Queue(maxsize=4 * spec.concurrency)
        async with asyncio.TaskGroup() as tg:
            consumers = [tg.create_task(self._consume(queue)) for _ in range(spec.concurrency)]
            try:
                for path, size in list(self._done_files):
                    self.doc["verify"]["files"] += 1
                    await self._enqueue_file(queue, path, size, verify=True)
            except BaseException:
                for consumer in consumers:
                    consumer.cancel()
                raise
            for _ in consumers:
                await queue.put(None)

    async def _walk(self, queue: asyncio.Queue[_Unit | None]) -> None:
        service = self.runner.service
        root = self.spec.path
        status = await self._retrying(lambda: service.stat(root))
        if not status.is_dir:
            await self._add_file(queue, status)
            return
        slots = asyncio.Semaphore(8)
        async with asyncio.TaskGroup() as tg:
            await self._walk_dir(queue, root, tg, slots, top=True)

    async def _walk_dir(
        self,
        queue: asyncio.Queue[_Unit | None],
        path: str,
        tg: asyncio.TaskGroup,
        slots: asyncio.Semaphore,
        *,
        top: bool = False,
    ) -> None:
        service = self.runner.service
        try:
            async with slots:
                entries = await self._retrying(lambda: service.list(path))
        except (DepotError, OSError) as exc:
            if top:
                raise
            self.fail(path, exc)
            return
        await queue.put(_Unit("list", path, self.runner.view().file_key(path)))
        for entry in entries:
            if entry.is_dir:
                if self.spec.recursive:
                    tg.create_task(self._walk_dir(queue, entry.path, tg, slots))
            else:
                await self._add_file(queue, entry)

    async def _add_file(self, queue: asyncio.Queue[_Unit | None], status: FileStatus) -> None:
        doc = self.doc
        doc["files"]["total"] += 1
        doc["bytes"]["total"] += status.size
        await self._enqueue_file(queue, status.path, status.size)

    async def _enqueue_file(
        self, queue: asyncio.Queue[_Unit | None], path: str, size: int, *, verify: bool = False
    ) -> None:
        view = self.runner.view()
        file_key = view.file_key(path)
        if self.spec.metadata_only:
            entry = _File(path, size, {0: 1}, 1)
            self.doc["segments"]["total"] += 1
            await queue.put(_Unit("stat", path, file_key, file=entry))
            return
        units = _cut(size, view.policy.segment_size, self.runner.page_size)
        entry = _File(path, size)
        for _, _, segment in units:
            entry.segments_left[segment] = entry.segments_left.get(segment, 0) + 1
        entry.units_left = len(units)
        if not verify:
            self.doc["segments"]["total"] += len(entry.segments_left)
        for start, end, segment in units:
            await queue.put(
                _Unit("load", path, file_key, start, end, segment, entry, verify=verify)
            )

    async def _consume(self, queue: asyncio.Queue[_Unit | None]) -> None:
        while True:
            unit = await queue.get()
            if unit is None:
                return
            await self._process(unit)

    async def _process(self, unit: _Unit) -> None:
        doc = self.doc
        entry = unit.file
        if unit.kind == "list":
            try:
                await self._send(unit)
            except (DepotError, OSError) as exc:
                log.debug("warming the listing of %s failed: %s", unit.path, exc)
            return
        assert entry is not None
        result: dict[str, Any] = {}
        if not entry.failed:
            pacer = self._pacer if unit.kind == "load" else None
            if pacer is not None:
                await pacer.take(unit.length)
            try:
                result = await self._send(unit)
            except (DepotError, OSError) as exc:
                entry.failed = True
                self.fail(unit.path, exc)
            if pacer is not None:
                pacer.refund(unit.length - int(result.get("bytes_from_ufs", 0)))
        if unit.verify:
            self._count_verify(result)
        else:
            self._count(unit, result, entry)
        entry.units_left -= 1
        left = entry.segments_left[unit.segment] - 1
        entry.segments_left[unit.segment] = left
        if left == 0 and not unit.verify:
            doc["segments"]["done"] += 1
        if entry.units_left == 0 and not unit.verify:
            if entry.failed:
                doc["files"]["failed"] += 1
            else:
                doc["files"]["done"] += 1
                self._done_files.append((entry.path, entry.size))

    def _count(self, unit: _Unit, result: Mapping[str, Any], entry: _File) -> None:
        doc = self.doc
        if unit.kind == "stat":
            doc["bytes"]["done"] += entry.size if not entry.failed else 0
            return
        if entry.failed:
            return
        doc["bytes"]["done"] += unit.length
        from_ufs = int(result.get("bytes_from_ufs", 0))
        doc["bytes"]["from_ufs"] += from_ufs
        doc["bytes"]["cached_before"] += max(0, unit.length - from_ufs)
        pages = doc["pages"]
        pages["total"] += int(result.get("pages", 0))
        pages["cached_before"] += int(result.get("cached_before", 0))
        pages["loaded"] += int(result.get("loaded", 0))
        pages["not_cached"] += int(result.get("pages", 0)) - int(result.get("cached", 0))

    def _count_verify(self, result: Mapping[str, Any]) -> None:
        verify = self.doc["verify"]
        verify["pages"] += int(result.get("pages", 0))
        verify["missing"] += int(result.get("missing", 0))
        verify["loaded"] += int(result.get("loaded", 0))
        verify["not_cached"] += int(result.get("pages", 0)) - int(result.get("cached", 0))

    # routing and retries -------------------------------------------------------------------------
    async def _retrying(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """``call()``, retried with backoff on transient errors for ``retry_for`` seconds."""
        deadline = time.monotonic() + self.runner.retry_for
        delay = 0.05
        while True:
            try:
                return await call()
            except DepotError as exc:
                if not exc.retryable or time.monotonic() >= deadline:
                    raise
                self.doc["retries"] += 1
                log.debug("job %s: retrying after %s", self.doc["id"], exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.runner.max_backoff)

    async def _send(self, unit: _Unit) -> dict[str, Any]:
        """Run a unit on the owner of its bytes (routed again on every retry).

        With ``replication`` R > 1, a load unit runs on each of the key's first R workers (the
        ones readers spread over), so that every replica answers from its cache; page counts
        and UFS bytes are then summed over the copies.
        """
        runner = self.runner
        copies = runner.copies(unit.file_key, unit.start) if unit.kind == "load" else 1

        async def once(replica: int) -> dict[str, Any]:
            owner = runner.owner(unit.file_key, unit.start, replica)
            if owner is None:
                return await runner.run_local(unit)
            return await runner.run_remote(owner.endpoint, unit)

        if copies <= 1:
            result: dict[str, Any] = await self._retrying(functools.partial(once, 0))
            return result
        results = await asyncio.gather(
            *(self._retrying(functools.partial(once, i)) for i in range(copies))
        )
        merged: dict[str, Any] = dict(results[0])
        for other in results[1:]:
            for key, value in other.items():
                if isinstance(value, int) and isinstance(merged.get(key), int):
                    merged[key] += value
        return merged

    # free ------------------------------------------------------------------------------------
    async def _free(self) -> None:
        runner = self.runner
        doc = self.doc
        spec = self.spec
        view = runner.view()
        targets: list[WorkerInfo | None] = [w for w in view.workers if w.is_live]
        if not any(w is not None and w.worker_id == runner.worker_id for w in targets):
            targets.append(None)  # this worker, whether or not the view lists it yet
        doc["walk_done"] = True
        doc["phase"] = "free"
        doc["workers"] = {"total": len(targets), "done": 0, "failed": 0}
        doc["freed"] = {"files": 0, "pages": 0, "bytes": 0, "metadata": 0}

        async def one(target: WorkerInfo | None) -> None:
            local = target is None or target.worker_id == runner.worker_id
            label = "this worker" if target is None else target.endpoint
            try:
                if local:
                    result = await self._retrying(
                        lambda: runner.service.free(spec.path, recursive=spec.recursive)
                    )
                else:
                    assert target is not None
                    endpoint = target.endpoint
                    result = await self._retrying(
                        lambda: runner.post(endpoint, FREE_ROUTE, spec.path,
                                            {"recursive": "1" if spec.recursive else "0"})
                    )
            except (DepotError, OSError) as exc:
                doc["workers"]["failed"] += 1
                self.fail(f"{spec.path} (on {label})", exc)
                return
            doc["workers"]["done"] += 1
            for key in doc["freed"]:
                doc["freed"][key] += int(result.get(key, 0))

        async with asyncio.TaskGroup() as tg:
            for target in targets:
                tg.create_task(one(target))
        doc["files"] = {"total": doc["freed"]["files"], "done": doc["freed"]["files"],
                        "failed": 0}
        doc["bytes"]["total"] = doc["bytes"]["done"] = doc["freed"]["bytes"]


def _leaf(error: BaseException) -> BaseException:
    """The first error inside (nested) exception groups."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def _cut(size: int, segment_size: int, page_size: int) -> list[tuple[int, int, int]]:
    """``(start, end, segment)`` of the load requests of a file of ``size`` bytes."""
    if size <= 0:
        return [(0, 0, 0)]  # opening it still warms the owner's metadata
    unit = max(page_size, LOAD_UNIT // page_size * page_size)
    out: list[tuple[int, int, int]] = []
    pos = 0
    while pos < size:
        segment = pos // segment_size if segment_size > 0 else 0
        stop = min(size, pos + unit)
        if segment_size > 0:
            stop = min(stop, (segment + 1) * segment_size)
        out.append((pos, stop, segment))
        pos = stop
    return out


# --- the runner ----------------------------------------------------------------------------------


class JobRunner:
    """Creates, runs, reports and stops jobs on one worker."""

    def __init__(
        self,
        service: ReadThroughService,
        *,
        view: Callable[[], ClusterView],
        store: ClusterStore,
        worker_id: str,
        endpoint: str,
        shared_store: bool = True,
        max_jobs: int = 4,
        flush_interval: float = 1.0,
        retry_for: float = 60.0,
        max_backoff: float = 2.0,
        adopt_interval: float = 5.0,
        stale_after: float = 30.0,
        request_timeout: float = 120.0,
    ) -> None:
        self.service = service
        self.view = view
        self.store = store
        self.worker_id = worker_id
        self.endpoint = endpoint
        self.shared_store = shared_store
        self.slots = asyncio.Semaphore(max_jobs)
        self.flush_interval = flush_interval
        self.retry_for = retry_for
        self.max_backoff = max_backoff
        self.adopt_interval = adopt_interval
        self.stale_after = stale_after
        self.request_timeout = request_timeout
        self._runs: dict[str, _Run] = {}
        self._pools: dict[str, ConnectionPool] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._warming: set[asyncio.Future[list[FileStatus]]] = set()
        self._closed = False

    @property
    def page_size(self) -> int:
        return self.service.pages.page_size

    # lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Resume this worker's active jobs, then watch for orphaned ones."""
        try:
            await self.adopt(resume_only=True)
        except DepotError as exc:
            log.warning("could not look for jobs to resume: %s", exc)
        self._watcher = asyncio.create_task(self._watch(), name="depot-jobs")

    async def stop(self) -> None:
        """Stop running jobs where they are (they stay active in the store, to be resumed)."""
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        runs = list(self._runs.values())
        for run in runs:
            if run.task is not None:
                run.task.cancel()
        for run in runs:
            if run.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await run.task
            with contextlib.suppress(DepotError):
                await self.store.kv_delete(CLAIMS_PREFIX + run.doc["id"])
        self._runs.clear()
        for warming in list(self._warming):
            warming.cancel()
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def _warmed(self, warming: asyncio.Future[list[FileStatus]]) -> None:
        """A listing started ahead of a walk is done: its errors are the walk's to report
        (a file's path is not a directory, a listing may be refused)."""
        self._warming.discard(warming)
        if not warming.cancelled():
            warming.exception()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.adopt_interval)
            try:
                await self.adopt()
            except DepotError as exc:
                log.debug("job watch: %s", exc)

    async def adopt(self, *, resume_only: bool = False) -> list[str]:
        """Take over active jobs nobody holds: this worker's own at once, others once stale."""
        if self._closed:
            return []
        # The small index of active jobs, not every document: this runs on every worker.
        active = await self.store.kv_list(ACTIVE_PREFIX)
        claims = await self.store.kv_list(CLAIMS_PREFIX) if active else {}
        taken: list[str] = []
        for key in active:
            job_id = key[len(ACTIVE_PREFIX):]
            if job_id in self._runs or CLAIMS_PREFIX + job_id in claims:
                continue
            doc = _decode(await self.store.kv_get(JOBS_PREFIX + job_id))
            if doc is None or doc.get("state") not in ACTIVE:
                await self.store.kv_delete(key)  # a job that ended without cleaning up
                continue
            mine = doc.get("coordinator") == self.worker_id
            stale = time.time() - float(doc.get("updated") or 0) >= self.stale_after
            if not mine and (resume_only or not stale):
                continue
            if not await self.store.kv_create(
                CLAIMS_PREFIX + job_id, self.worker_id.encode(), ephemeral=True
            ):
                continue
            # Read again under the claim: the job may have ended since it was read.
            doc = _decode(await self.store.kv_get(JOBS_PREFIX + job_id))
            if doc is None or doc.get("state") not in ACTIVE:
                await self.store.kv_delete(CLAIMS_PREFIX + job_id)
                continue
            if not mine:
                log.info("adopting job %s of %s", job_id, doc.get("coordinator"))
            doc["coordinator"] = self.worker_id
            doc["coordinator_endpoint"] = self.endpoint
            self._launch(doc)
            taken.append(job_id)
        return taken

    def _launch(self, doc: dict[str, Any]) -> None:
        run = _Run(self, doc)
        self._runs[doc["id"]] = run
        run.task = asyncio.create_task(run.run(), name=f"depot-job-{doc['id']}")

    # API ------------------------------------------------------------------------------------------
    async def submit(self, spec: JobSpec) -> dict[str, Any]:
        """Create a job and start it here; returns its first document."""
        if self._closed:
            raise Unavailable("the worker is shutting down")
        if spec.kind == "load":
            # The walk's first listing starts with this check rather than after it: its answer
            # is in the listing cache (or in flight) when the walk asks, so a load of a
            # directory fetches its first page one UFS round trip sooner.
            warming = asyncio.ensure_future(self.service.list(spec.path))
            self._warming.add(warming)
            warming.add_done_callback(self._warmed)
            await self.service.stat(spec.path)  # NotFound, InvalidPath: the caller's 4xx
        else:
            try:
                self.service.resolve(spec.path)
            except NotFound:
                if not self.service.mounts.child_mounts(spec.path):
                    raise
        await self._prune()
        for _ in range(8):
            job_id = secrets.token_hex(4)
            doc = _new_doc(job_id, spec, self.worker_id, self.endpoint)
            if await self.store.kv_create(JOBS_PREFIX + job_id, _encode(doc)):
                break
        else:  # pragma: no cover - 8 collisions of 32 random bits
            raise Unavailable("could not allocate a job id")
        await self.store.kv_create(CLAIMS_PREFIX + job_id, self.worker_id.encode(), ephemeral=True)
        await self.store.kv_put(ACTIVE_PREFIX + job_id, self.worker_id.encode())
        self._launch(doc)
        return dict(doc)

    async def get(self, job_id: str, *, local: bool = False) -> dict[str, Any]:
        check_job_id(job_id)
        run = self._runs.get(job_id)
        if run is not None:
            return run.snapshot()
        doc = _decode(await self.store.kv_get(JOBS_PREFIX + job_id))
        if doc is None:
            if not local and not self.shared_store:
                found = await self._ask_peers(f"/api/v1/jobs/{job_id}?local=1")
                if found:
                    return found[0]
            raise NotFound("no such job", job_id)
        if doc.get("state") in (QUEUED, RUNNING) and await self.stop_flag(job_id):
            doc["state"] = STOPPING
        return doc

    async def list_jobs(self, *, local: bool = False) -> list[dict[str, Any]]:
        docs: dict[str, dict[str, Any]] = {}
        for key, data in (await self.store.kv_list(JOBS_PREFIX)).items():
            doc = _decode(data)
            if doc is not None:
                docs[key[len(JOBS_PREFIX):]] = doc
        for job_id, run in self._runs.items():
            docs[job_id] = run.snapshot()
        if not local and not self.shared_store:
            for peer_list in await self._ask_peers("/api/v1/jobs?local=1"):
                for doc in peer_list.get("jobs", []):
                    if isinstance(doc, dict) and isinstance(doc.get("id"), str):
                        docs.setdefault(doc["id"], doc)
        return sorted(docs.values(), key=lambda d: float(d.get("created") or 0), reverse=True)

    async def request_stop(self, job_id: str, *, local: bool = False) -> dict[str, Any]:
        check_job_id(job_id)
        run = self._runs.get(job_id)
        if (
            run is None
            and not local
            and not self.shared_store
            and await self.store.kv_get(JOBS_PREFIX + job_id) is None
        ):
            found = await self._ask_peers(f"/api/v1/jobs/{job_id}/stop?local=1", "POST")
            if found:
                return found[0]
        doc = await self.get(job_id, local=True) if run is None else run.snapshot()
        if doc.get("state") in FINISHED:
            return doc
        await self.store.kv_put(STOPS_PREFIX + job_id, b"1")
        if run is not None:
            run.request_stop()
            return run.snapshot()
        doc["state"] = STOPPING
        return doc

    async def stop_flag(self, job_id: str) -> bool:
        try:
            return await self.store.kv_get(STOPS_PREFIX + job_id) is not None
        except DepotError:
            return False

    # store ----------------------------------------------------------------------------------------
    async def write(self, doc: Mapping[str, Any]) -> None:
        if doc["id"] not in self._runs:
            return  # finished meanwhile: the final document is written by finish()
        stored = dict(doc)
        if stored.get("state") == STOPPING:
            stored["state"] = RUNNING  # a stop request is its own key; the run decides
        await self.store.kv_put(JOBS_PREFIX + doc["id"], _encode(stored))

    async def finish(self, job_id: str, doc: Mapping[str, Any]) -> None:
        """Write the final document and release the job."""
        for attempt in range(20):
            try:
                await self.store.kv_put(JOBS_PREFIX + job_id, _encode(doc))
                break
            except DepotError as exc:
                if attempt == 19:
                    log.error("could not record the end of job %s: %s", job_id, exc)
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        for key in (STOPS_PREFIX + job_id, ACTIVE_PREFIX + job_id, CLAIMS_PREFIX + job_id):
            with contextlib.suppress(DepotError):
                await self.store.kv_delete(key)
        self._runs.pop(job_id, None)
        log.info(
            "job %s %s: %s files, %s failed, %d bytes",
            job_id, doc.get("state"), doc["files"]["done"], doc["files"]["failed"],
            doc["bytes"]["done"],
        )

    async def _prune(self) -> None:
        """Keep the store small: delete the oldest finished jobs over ``MAX_FINISHED_JOBS``."""
        try:
            docs = await self.store.kv_list(JOBS_PREFIX)
            finished = []
            for key, data in docs.items():
                doc = _decode(data)
                if doc is None or doc.get("state") in FINISHED:
                    finished.append((float((doc or {}).get("created") or 0), key))
            finished.sort()
            for _, key in finished[: max(0, len(finished) - MAX_FINISHED_JOBS + 1)]:
                await self.store.kv_delete(key)
        except DepotError as exc:
            log.debug("could not prune old jobs: %s", exc)

    # routing ----------------------------------------------------------------------------------------
    def owner(self, file_key: str | None, offset: int, replica: int = 0) -> WorkerInfo | None:
        """The worker that owns these bytes (its ``replica``-th copy); None when it is this
        worker (or no ring yet)."""
        if file_key is None:
            return None
        workers = self.view().route(file_key, offset)
        if len(workers) <= replica or workers[replica].worker_id == self.worker_id:
            return None
        return workers[replica]

    def copies(self, file_key: str | None, offset: int) -> int:
        """How many workers cache these bytes: ``replication``, at most the workers placed."""
        view = self.view()
        if file_key is None or view.policy.replication <= 1:
            return 1
        return max(1, min(view.policy.replication, len(view.ring.workers)))

    def pool(self, endpoint: str) -> ConnectionPool:
        pool = self._pools.get(endpoint)
        if pool is None:
            pool = ConnectionPool(
                parse_endpoint(endpoint), max_connections=64, timeout=self.request_timeout
            )
            self._pools[endpoint] = pool
        return pool

    async def run_local(self, unit: _Unit) -> dict[str, Any]:
        service = self.service
        if unit.kind == "load":
            opened = await service.open(unit.path)
            return await service.load_range(opened, unit.start, unit.end, verify=unit.verify)
        if unit.kind == "stat":
            await service.stat(unit.path)
        else:
            await service.list(unit.path)
        return {}

    async def run_remote(self, endpoint: str, unit: _Unit) -> dict[str, Any]:
        if unit.kind == "load":
            params = {"start": str(unit.start), "end": str(unit.end)}
            if unit.verify:
                params["verify"] = "1"
            return await self.post(endpoint, LOAD_ROUTE, unit.path, params)
        route = "/api/v1/stat" if unit.kind == "stat" else "/api/v1/list"
        response = await self.pool(endpoint).request(f"{route}?path={quote(unit.path, safe='')}")
        if response.status >= 300:
            raise error_from_response(response, unit.path)
        return {}

    async def post(
        self, endpoint: str, route: str, path: str, params: Mapping[str, str]
    ) -> dict[str, Any]:
        query = "&".join([f"path={quote(path, safe='')}"] + [f"{k}={v}" for k, v in params.items()])
        response = await self.pool(endpoint).request(f"{route}?{query}", method="POST")
        if response.status >= 300:
            raise error_from_response(response, path)
        data = response.json()
        if not isinstance(data, dict):
            raise Unavailable(f"worker {endpoint} sent a malformed answer to {route}")
        return data

    async def _ask_peers(self, target: str, method: str = "GET") -> list[dict[str, Any]]:
        """Answers of the other live workers (for stores that are not shared)."""
        peers = [w for w in self.view().workers if w.worker_id != self.worker_id and w.is_live]

        async def ask(info: WorkerInfo) -> dict[str, Any] | None:
            try:
                response = await self.pool(info.endpoint).request(target, method=method)
            except DepotError:
                return None
            if response.status != 200:
                return None
            with contextlib.suppress(DepotError):
                data = response.json()
                return data if isinstance(data, dict) else None
            return None

        answers = await asyncio.gather(*(ask(p) for p in peers))
        return [a for a in answers if a is not None]


__all__ = [
    "ACTIVE",
    "ACTIVE_PREFIX",
    "CLAIMS_PREFIX",
    "FINISHED",
    "JOBS_PREFIX",
    "STOPS_PREFIX",
    "FileJobStore",
    "JobRunner",
    "JobSpec",
    "Pacer",
    "parse_bool",
]
