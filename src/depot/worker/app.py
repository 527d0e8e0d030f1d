"""HTTP routes of the worker: maps requests onto the read-through service and errors onto codes."""

from __future__ import annotations

import asyncio
import builtins
import logging
import re
import sys
import time
from collections.abc import Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import orjson

from depot import __version__
from depot.core.errors import (
    DepotError,
    InvalidArgument,
    InvalidRange,
    NotFound,
    RequestTooLarge,
    StaleVersion,
    Unavailable,
)
from depot.core.types import Attributes, ByteRange, FileStatus, PageId
from depot.namespace.paths import normalize_path
from depot.observability.metrics import WorkerMetrics
from depot.pagestore.direct import decode_touched, describe
from depot.pagestore.local import LocalPageStore
from depot.placement.view import ClusterView
from depot.worker.http import Request, ResponseWriter, error_json, response_head
from depot.worker.jobs import JobRunner, JobSpec, parse_bool
from depot.worker.lanes import LANE_MIN_BYTES, HotLanes, LanePart, LaneRead
from depot.worker.service import OpenedFile, ReadThroughService, mount_summary
from depot.worker.writes import WriteService

log = logging.getLogger(__name__)

JSON = (("Content-Type", "application/json"),)
# From Python 3.12 a transport keeps a reference to bytes it could not send at once instead of
# copying them, so a reused buffer must be fully sent before it is filled again.
TRANSPORT_KEEPS_REFERENCES = sys.version_info >= (3, 12)


class MethodNotAllowed(InvalidArgument):
    http_status = 405


WRITE_ROUTE = "/api/v1/write"
#: Request header of a write: the object's attributes as JSON (see Attributes.to_dict).
ATTRIBUTES_HEADER = "x-depot-attributes"
METRICS_ROUTE = "/metrics"
JOBS_PREFIX = "/api/v1/jobs/"
JOB_ROUTE = JOBS_PREFIX + "{job_id}"
JOB_STOP_ROUTE = JOBS_PREFIX + "{job_id}/stop"
#: Ranges one ``POST /api/v1/cache/load?ranges=`` may name (its query stays well under 64 KiB).
MAX_LOAD_RANGES = 1024


def _status_json(obj: object) -> dict[str, Any]:
    """orjson's hook for the statuses of a listing (``OPT_PASSTHROUGH_DATACLASS``)."""
    if isinstance(obj, FileStatus):
        return obj.to_dict()
    raise TypeError(f"not JSON: {type(obj).__name__}")


def _json(writer: ResponseWriter, data: Any, status: int = 200) -> None:
    # orjson: a 10k-entry listing encodes in under a millisecond (json.dumps: ~10 ms).
    writer.send(status, orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS), JSON)


def query_params(request: Request) -> dict[str, str]:
    """Decode the query string exactly once; duplicates and bad encodings are 400s."""
    if not request.query:
        return {}
    try:
        parsed = parse_qs(
            request.query, keep_blank_values=True, strict_parsing=True, errors="strict",
            max_num_fields=32,
        )
    except UnicodeDecodeError:
        raise InvalidArgument("query string is not valid UTF-8") from None
    except ValueError as exc:
        raise InvalidArgument(f"malformed query string: {exc}") from None
    out: dict[str, str] = {}
    for key, values in parsed.items():
        if len(values) != 1:
            raise InvalidArgument(f"query parameter {key!r} given more than once")
        out[key] = values[0]
    return out


def _require_path(params: dict[str, str]) -> str:
    path = params.get("path")
    if path is None:
        raise InvalidArgument("missing query parameter 'path'")
    return path


def _offset(params: dict[str, str], name: str, default: int) -> int:
    text = params.get(name)
    if text is None:
        return default
    if not text.isdigit() or len(text) > 19:
        raise InvalidArgument(f"{name} must be a byte offset, got {text!r}")
    return int(text)


_TOKEN = re.compile(r"[0-9a-f]{32}")
_CHECKSUM = re.compile(r"[0-9a-f]{16}")


def _slot_token(params: dict[str, str]) -> str:
    token = params.get("token", "")
    if not _TOKEN.fullmatch(token):
        raise InvalidArgument("token must be the 32 hex digits /api/v1/write/open answered")
    return token


def _byte_ranges(text: str) -> list[tuple[int, int]]:
    """``A-B,C-D`` (ends exclusive) of a load request; at most ``MAX_LOAD_RANGES`` ranges."""
    spans: list[tuple[int, int]] = []
    for part in text.split(","):
        first, dash, last = part.partition("-")
        if not (dash and first.isdigit() and last.isdigit() and len(first) < 20
                and len(last) < 20):
            raise InvalidArgument(f"ranges: {part!r} is not START-END (bytes, end exclusive)")
        start, end = int(first), int(last)
        if end < start:
            raise InvalidArgument(f"ranges: {part!r} ends before it starts")
        spans.append((start, end))
    if len(spans) > MAX_LOAD_RANGES:
        raise InvalidArgument(f"ranges: at most {MAX_LOAD_RANGES} ranges in one request")
    return spans


def _job_route(path: str) -> str | None:
    """The job route template ``path`` matches (``/api/v1/jobs/ID`` or ``.../ID/stop``)."""
    if not path.startswith(JOBS_PREFIX):
        return None
    rest = path[len(JOBS_PREFIX) :]
    if rest.endswith("/stop") and "/" not in rest[: -len("/stop")]:
        return JOB_STOP_ROUTE
    if rest and "/" not in rest:
        return JOB_ROUTE
    return None


def cache_stats_document(service: ReadThroughService, writes: WriteService) -> dict[str, Any]:
    """What ``GET /api/v1/cache/stats`` answers; the metrics collector reads the same document."""
    out = {**service.cache_stats(), "writes": writes.stats_dict()}
    writeback = writes.writeback_stats()
    if writeback is not None:
        out["writeback"] = writeback
    return out


def _attributes(request: Request) -> Attributes | None:
    """The ``X-Depot-Attributes`` of a write: ``{"headers": {...}, "metadata": {...}}``."""
    text = request.header(ATTRIBUTES_HEADER)
    if text is None:
        return None
    try:
        return Attributes.from_dict(orjson.loads(text))
    except (orjson.JSONDecodeError, ValueError) as exc:
        raise InvalidArgument(f"malformed {ATTRIBUTES_HEADER} header: {exc}") from None


def _etag_value(header: str | None) -> str | None:
    """The entity tag of an ``If-Match`` header, quoted as the worker sends it."""
    if header is None:
        return None
    value = header.strip().removeprefix("W/")
    if not (len(value) >= 2 and value[0] == value[-1] == '"'):
        value = f'"{value}"'
    return value


class WorkerApp:
    """Routes one request; every error becomes a JSON body with the right status."""

    def __init__(
        self,
        service: ReadThroughService,
        *,
        worker_id: str,
        max_request_bytes: int,
        cluster_view: Callable[[], ClusterView] | None = None,
        writes: WriteService | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        """``metrics``: where request durations go, and what ``GET /metrics`` renders (the
        route exists only with it)."""
        self.service = service
        self.writes = writes if writes is not None else WriteService(service)
        self.worker_id = worker_id
        self.cluster_view = cluster_view
        self.max_request_bytes = max_request_bytes
        self._scratch_pool: list[bytearray] = []
        self._routes: dict[str, Callable[[Request, ResponseWriter], Any]] = {
            "/api/v1/read": self.read,
            "/api/v1/stat": self.stat,
            "/api/v1/list": self.list,
            "/api/v1/info": self.info,
            "/api/v1/cache/stats": self.cache_stats,
            "/api/v1/cluster": self.cluster,
            "/healthz": self.health,
            "/openapi.json": self.openapi,
        }
        self.metrics = metrics
        if metrics is not None:
            self._routes[METRICS_ROUTE] = self.prometheus
        self._openapi: bytes | None = None
        # Preload and free (worker/jobs.py): set by the daemon once the cluster is joined.
        self.jobs: JobRunner | None = None
        # Threads that send hot reads (worker/lanes.py): set by the daemon, None when off.
        self.lanes: HotLanes | None = None
        Route = Callable[[Request, ResponseWriter], Any]
        self._action_routes: dict[str, dict[str, Route]] = {
            "/api/v1/cache/load": {"POST": self.cache_load},
            "/api/v1/cache/free": {"POST": self.cache_free},
            "/api/v1/cache/hits": {"POST": self.cache_hits},
            "/api/v1/jobs": {"GET": self.jobs_list, "POST": self.jobs_create},
            # writes (worker/writes.py, docs/writes.md)
            WRITE_ROUTE: {"PUT": self.write},
            "/api/v1/file": {"DELETE": self.delete},
            "/api/v1/mkdir": {"POST": self.mkdir},
            "/api/v1/rename": {"POST": self.rename},
            "/api/v1/sync": {"POST": self.sync},
            "/api/v1/write/open": {"POST": self.write_open},
            "/api/v1/write/commit": {"POST": self.write_commit},
            "/api/v1/write/abort": {"POST": self.write_abort},
        }

    @staticmethod
    def streams(method: str, path: str) -> bool:
        """Whether the HTTP server streams this request's body to the handler (writes)."""
        return method == "PUT" and path == WRITE_ROUTE

    async def __call__(self, request: Request, writer: ResponseWriter) -> None:
        started = time.perf_counter()
        try:
            route = self._routes.get(request.path)
            if route is None:
                await self._action(request, writer)
            elif request.method not in ("GET", "HEAD"):
                raise MethodNotAllowed(
                    f"method {request.method} is not allowed here", request.path
                )
            else:
                await route(request, writer)
        finally:
            if self.metrics is not None and not getattr(writer, "handed_off", False):
                # (a read handed to a lane is timed by the lane)
                self.metrics.observe_request(
                    self._route_label(request.path), time.perf_counter() - started
                )

    def _route_label(self, path: str) -> str:
        """The route a request is counted under: a fixed set, so unknown paths are ``other``."""
        if path in self._routes or path in self._action_routes:
            return path
        return _job_route(path) or "other"

    async def _action(self, request: Request, writer: ResponseWriter) -> None:
        """Routes that take POST (cache load/free, jobs); GET/HEAD-only routes are above."""
        path = request.path
        methods = self._action_routes.get(path)
        if methods is None:
            job_route = _job_route(path)
            if job_route == JOB_STOP_ROUTE:
                methods = {"POST": self.job_stop}
            elif job_route == JOB_ROUTE:
                methods = {"GET": self.job_get}
        if methods is None:
            raise NotFound("no such endpoint", path)
        handler = methods.get("GET" if request.method == "HEAD" else request.method)
        if handler is None:
            raise MethodNotAllowed(f"method {request.method} is not allowed here", path)
        await handler(request, writer)

    def _jobs(self) -> JobRunner:
        if self.jobs is None:
            raise Unavailable("jobs are not available on this worker yet")
        return self.jobs

    async def cache_load(self, request: Request, writer: ResponseWriter) -> None:
        """Load pages of ``[start, end)`` of a file into this worker's cache (a job's step), or
        of every range of ``ranges`` (``A-B,C-D``, ends exclusive: the segments a client's
        prefetch on open routes to this worker, in one request)."""
        params = query_params(request)
        spans = _byte_ranges(params["ranges"]) if "ranges" in params else None
        opened = await self.service.open(_require_path(params))
        size = opened.status.size
        if spans is not None:
            verify = parse_bool("verify", params.get("verify"))
            results = await asyncio.gather(
                *(self.service.load_range(opened, a, min(b, size), verify=verify) for a, b in spans)
            )
            totals: dict[str, int] = {}
            for result in results:
                for key, value in result.items():
                    totals[key] = totals.get(key, 0) + value
            _json(writer, {"path": opened.status.path, "size": size, "ranges": len(spans),
                           **totals})
            return
        start = _offset(params, "start", 0)
        end = min(_offset(params, "end", size), size)
        if end < start and start < size:
            raise InvalidArgument(f"end ({end}) is before start ({start})")
        result = await self.service.load_range(
            opened, start, end, verify=parse_bool("verify", params.get("verify")),
            for_reader=parse_bool("for_reader", params.get("for_reader")),
        )
        _json(writer, {"path": opened.status.path, "size": size, **result})

    async def cache_free(self, request: Request, writer: ResponseWriter) -> None:
        """Drop this worker's cached pages and metadata of a path."""
        params = query_params(request)
        path = _require_path(params)
        recursive = parse_bool("recursive", params.get("recursive"))
        result = await self.service.free(path, recursive=recursive)
        _json(writer, {"path": normalize_path(path), **result})

    async def cache_hits(self, request: Request, writer: ResponseWriter) -> None:
        """Hits a local client served from this worker's page files itself (short-circuit
        reads): counted in the cache stats; the pages named in ``touch`` count as used."""
        params = query_params(request)
        pages = _offset(params, "pages", 0)
        nbytes = _offset(params, "bytes", 0)
        try:
            touched = decode_touched(params.get("touch", ""))
        except ValueError as exc:
            raise InvalidArgument(f"touch: {exc}") from None
        stored = self.service.record_short_circuit(pages, nbytes, touched)
        _json(writer, {"pages": pages, "bytes": nbytes, "touched": stored})

    async def jobs_create(self, request: Request, writer: ResponseWriter) -> None:
        spec = JobSpec.from_params(query_params(request))
        _json(writer, await self._jobs().submit(spec))

    async def jobs_list(self, request: Request, writer: ResponseWriter) -> None:
        local = parse_bool("local", query_params(request).get("local"))
        _json(writer, {"jobs": await self._jobs().list_jobs(local=local)})

    async def job_get(self, request: Request, writer: ResponseWriter) -> None:
        local = parse_bool("local", query_params(request).get("local"))
        job_id = request.path.rsplit("/", 1)[1]
        _json(writer, await self._jobs().get(job_id, local=local))

    async def job_stop(self, request: Request, writer: ResponseWriter) -> None:
        local = parse_bool("local", query_params(request).get("local"))
        job_id = request.path.rsplit("/", 2)[1]
        _json(writer, await self._jobs().request_stop(job_id, local=local))

    # writes --------------------------------------------------------------------------------------
    async def write(self, request: Request, writer: ResponseWriter) -> None:
        """Whole-file write: the body is the new content; answers with the new status."""
        path = _require_path(query_params(request))
        stream = request.stream
        if stream is None:  # the server streams every PUT of this route
            raise InvalidArgument("a write needs a request body")
        status = await self.writes.write(
            path, stream, stream.length, attributes=_attributes(request)
        )
        _json(writer, status.to_dict())

    async def write_open(self, request: Request, writer: ResponseWriter) -> None:
        """Local write, step 1: a staging file for a writer on this node (write-back mounts)."""
        params = query_params(request)
        path = _require_path(params)
        size = _offset(params, "size", 0)
        _json(writer, await self.writes.open_local(path, size or None))

    async def write_commit(self, request: Request, writer: ResponseWriter) -> None:
        """Local write, step 2: acknowledge the staging file the writer filled and fsync'd."""
        params = query_params(request)
        path = _require_path(params)
        token = _slot_token(params)
        if "size" not in params:
            raise InvalidArgument("missing query parameter 'size'")
        size = _offset(params, "size", 0)
        checksum = params.get("checksum", "")
        if not _CHECKSUM.fullmatch(checksum):
            raise InvalidArgument("checksum must be the xxh3_64 of the content, 16 hex digits")
        status = await self.writes.commit_local(
            path, token, size, checksum, attributes=_attributes(request)
        )
        _json(writer, status.to_dict())

    async def write_abort(self, request: Request, writer: ResponseWriter) -> None:
        """Local write, given up: drop the staging file (nothing was acknowledged)."""
        token = _slot_token(query_params(request))
        _json(writer, {"token": token, "dropped": await self.writes.abort_local(token)})

    async def delete(self, request: Request, writer: ResponseWriter) -> None:
        path = _require_path(query_params(request))
        await self.writes.delete(path)
        _json(writer, {"path": normalize_path(path), "deleted": True})

    async def mkdir(self, request: Request, writer: ResponseWriter) -> None:
        status = await self.writes.mkdir(_require_path(query_params(request)))
        _json(writer, status.to_dict())

    async def rename(self, request: Request, writer: ResponseWriter) -> None:
        params = query_params(request)
        src, dst = params.get("src"), params.get("dst")
        if src is None or dst is None:
            raise InvalidArgument("missing query parameter 'src' or 'dst'")
        status = await self.writes.rename(src, dst)
        _json(writer, {"src": normalize_path(src), **status.to_dict()})

    async def sync(self, request: Request, writer: ResponseWriter) -> None:
        """Write-back: with ``wait=1``, wait (``timeout`` s, capped by the worker) until the
        writes pending now (of ``path``, or all) are uploaded; 504 Timeout if they are not."""
        params = query_params(request)
        path = params.get("path") or None
        wait = parse_bool("wait", params.get("wait"))
        limit: float | None = None
        text = params.get("timeout")
        if text is not None:
            try:
                limit = float(text)
            except ValueError:
                raise InvalidArgument(f"timeout must be seconds, got {text!r}") from None
            if not limit >= 0:
                raise InvalidArgument(f"timeout must be seconds, got {text!r}")
        _json(writer, await self.writes.sync(path, wait=wait, limit=limit))

    async def health(self, request: Request, writer: ResponseWriter) -> None:
        _json(writer, {"status": "ok"})

    async def info(self, request: Request, writer: ResponseWriter) -> None:
        _json(
            writer,
            {
                "version": __version__,
                "worker_id": self.worker_id,
                "page_size": self.service.pages.page_size,
                "mounts": mount_summary(self.service.mounts),
                **self._local_info(),
            },
        )

    def _local_info(self) -> dict[str, Any]:
        """Where this worker's pages are, for a client on the same node (short-circuit reads)."""
        pages = self.service.pages
        if not isinstance(pages, LocalPageStore):
            return {}
        return {"local": describe([d.path for d in pages.dir_stats()], pages.page_size)}

    async def cluster(self, request: Request, writer: ResponseWriter) -> None:
        """The ring view clients route by: workers, placement settings, mounts (no secrets)."""
        if self.cluster_view is None:
            raise NotFound("this worker is not part of a cluster", request.path)
        _json(writer, self.cluster_view().to_document())

    async def openapi(self, request: Request, writer: ResponseWriter) -> None:
        if self._openapi is None:
            self._openapi = resources.files("depot.worker").joinpath("openapi.json").read_bytes()
        writer.send(200, self._openapi, JSON)

    async def cache_stats(self, request: Request, writer: ResponseWriter) -> None:
        lanes = self.lanes
        lanes_document = lanes.stats_document() if lanes is not None else None
        document = cache_stats_document(self.service, self.writes)
        if lanes_document is not None:
            document["hot_lanes"] = lanes_document
        _json(writer, document)

    async def prometheus(self, request: Request, writer: ResponseWriter) -> None:
        """Prometheus text exposition of this worker's metrics (counters read now)."""
        assert self.metrics is not None  # the route is registered only with metrics
        writer.send(200, self.metrics.render(), (("Content-Type", self.metrics.content_type),))

    async def stat(self, request: Request, writer: ResponseWriter) -> None:
        params = query_params(request)
        status = await self.service.stat(
            _require_path(params), attributes=parse_bool("attributes", params.get("attributes"))
        )
        _json(writer, status.to_dict())

    async def list(self, request: Request, writer: ResponseWriter) -> None:
        params = query_params(request)
        path = _require_path(params)
        entries = await self.service.list(path)
        # Each status becomes its dict only while orjson writes it. A list of ten thousand
        # dicts lived through the collector's young generations and brought on a full
        # collection (33 ms here) every few listings of a large directory.
        body = orjson.dumps(
            {"path": normalize_path(path), "entries": entries},
            default=_status_json,
            option=orjson.OPT_PASSTHROUGH_DATACLASS,
        )
        writer.send(200, body, JSON)

    async def read(self, request: Request, writer: ResponseWriter) -> None:
        params = query_params(request)
        opened = await self.service.open(
            _require_path(params), _etag_value(request.header("if-match"))
        )
        size = opened.status.size
        range_header = request.header("range")
        if range_header is not None and size == 0:
            rng = None  # a range over an empty file: answer with the (empty) whole file
        else:
            try:
                rng = ByteRange.parse_http(range_header, size)
            except InvalidRange as exc:
                writer.send(416, error_json(exc), [*JSON, ("Content-Range", f"bytes */{size}")])
                return
        status = 206 if rng is not None else 200
        if rng is None:
            rng = ByteRange(0, size)
        if rng.length > self.max_request_bytes:
            raise RequestTooLarge(
                f"range of {rng.length} bytes is over the limit of {self.max_request_bytes}"
            )
        plan = self.service.plan(opened, rng)
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("ETag", opened.status.entity_tag),
            ("X-Depot-Size", str(size)),
            ("X-Depot-Cache", plan.cache_state),
            ("Accept-Ranges", "bytes"),
        ]
        if status == 206:
            headers.append(("Content-Range", f"bytes {rng.start}-{rng.end - 1}/{size}"))
        if writer.head_only or rng.length == 0:
            writer.start(status, headers, rng.length)
            return
        lanes = self.lanes
        if (
            lanes is not None
            and rng.length >= LANE_MIN_BYTES
            and plan.cached == len(plan.pages)
            and (read := self._lane_read(opened, rng, status, headers, request.keep_alive))
            and lanes.reserve()
        ):
            # Every page is stored: this connection's large reads are sent from a thread.
            read.planned_on_loop = True
            if writer.hand_off(lambda sock, received: lanes.start(sock, received, read)):
                return
            lanes.release()
        scratch = self._scratch_pool.pop() if self._scratch_pool else bytearray(
            self.service.pages.page_size
        )
        chunks = self.service.read_chunks(opened, rng, scratch)
        try:
            # The first chunk is read before the head goes out, so a dead UFS or a changed
            # object still gets a proper status code rather than a cut connection.
            first = await chunks.__anext__()
            writer.start(status, headers, rng.length)
            writer.write(first)
            await self._sent(writer)
            async for chunk in chunks:
                writer.write(chunk)
                await self._sent(writer)
        finally:
            await chunks.aclose()
            reusable = not (TRANSPORT_KEEPS_REFERENCES and writer.pending())
            if reusable and len(self._scratch_pool) < 16:
                self._scratch_pool.append(scratch)

    # hot lanes (worker/lanes.py) ------------------------------------------------------------
    def _lane_read(
        self,
        opened: OpenedFile,
        rng: ByteRange,
        status: int,
        headers: builtins.list[tuple[str, str]],
        keep_alive: bool,
    ) -> LaneRead | None:
        """The parts of a read whose pages are all in the store, or None."""
        pages = self.service.pages
        page_size = pages.page_size
        key = opened.file_id.key
        parts = []
        for index in rng.pages(page_size):
            page = PageId(key, index)
            length = pages.page_length(page)
            if length is None:
                return None
            start = index * page_size
            lo = max(rng.start, start) - start
            hi = min(rng.end, start + length) - start
            if hi <= lo:
                return None  # a stored page shorter than the file says: the loop sorts it out
            parts.append(LanePart(page, length, lo, hi))
        head = response_head(status, headers, rng.length, keep_alive)
        return LaneRead(head, parts, rng.length, keep_alive, opened)

    def prepare_now(self, request: Request) -> LaneRead | None:
        """The read of a request a lane may answer without the loop (called in its thread):
        a ``GET /api/v1/read`` of a file whose status is cached and fresh, every page stored.
        None for anything else, errors included: the loop answers those."""
        if request.method != "GET" or request.path != "/api/v1/read":
            return None
        try:
            params = query_params(request)
            opened = self.service.open_now(
                _require_path(params), _etag_value(request.header("if-match"))
            )
            if opened is None:
                return None
            size = opened.status.size
            rng = ByteRange.parse_http(request.header("range"), size) if size else None
        except DepotError:
            return None
        status = 206 if rng is not None else 200
        if rng is None:
            rng = ByteRange(0, size)
        if rng.length == 0 or rng.length > self.max_request_bytes:
            return None
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("ETag", opened.status.entity_tag),
            ("X-Depot-Size", str(size)),
            ("X-Depot-Cache", "hit"),
            ("Accept-Ranges", "bytes"),
        ]
        if status == 206:
            headers.append(("Content-Range", f"bytes {rng.start}-{rng.end - 1}/{size}"))
        return self._lane_read(opened, rng, status, headers, request.keep_alive)

    async def read_on_loop(self, read: LaneRead, part: LanePart, out: memoryview) -> None:
        """A part a lane could not read from its page file (evicted or damaged since it was
        planned): read through the read path, which drops a damaged page and refetches it."""
        opened = read.context
        assert isinstance(opened, OpenedFile)
        start = part.page.index * self.service.pages.page_size
        rng = ByteRange(start + part.lo, start + part.hi)
        scratch = bytearray(self.service.pages.page_size)
        at = 0
        chunks = self.service.read_chunks(opened, rng, scratch)
        try:
            async for chunk in chunks:
                out[at : at + len(chunk)] = chunk
                at += len(chunk)
        finally:
            await chunks.aclose()
        if at != len(out):
            raise StaleVersion("the file changed while it was being read", opened.resolved.path)

    def lane_served(self, read: LaneRead, seconds: float, hits: builtins.list[LanePart]) -> None:
        """Account a read a lane answered: the parts it read from page files are hits (and
        used, for eviction); its file status came from the cache unless the loop opened it."""
        if not read.planned_on_loop:
            self.service.count_metadata_hit()
        self.service.count_hits([part.page for part in hits], sum(p.hi - p.lo for p in hits))
        if self.metrics is not None:
            self.metrics.observe_request("/api/v1/read", seconds)

    @staticmethod
    async def _sent(writer: ResponseWriter) -> None:
        """Wait until ``scratch`` may be overwritten by the next page."""
        if TRANSPORT_KEEPS_REFERENCES and writer.pending():
            await writer.flush()
        else:
            await writer.drain()
