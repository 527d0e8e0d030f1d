"""Prometheus metrics of a worker, kept in a registry its owner passes in (never the global one).

Nothing is counted twice. The worker already keeps the counters ``GET /api/v1/cache/stats`` and
``depot status`` show (read path, page store, writes, write-back queue); ``WorkerCollector`` turns
that same document into metric families when Prometheus scrapes, so the hot path pays nothing for
them. The one value recorded per request is its duration, observed once into a histogram by route
(``WorkerMetrics.observe_request``).

This module imports no other depot package: the stats document comes in as a callable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

# Returns the document of ``GET /api/v1/cache/stats``.
StatsSource = Callable[[], Mapping[str, Any]]

REQUEST_DURATION = "depot_http_request_duration_seconds"
# From cached small reads (a fraction of a millisecond) to large ranges and writes (seconds).
DURATION_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)

Key = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Stat:
    """A metric family read from the stats document: each sample pairs its label values with the
    key path of its value (``("writeback", "dirty_bytes")``)."""

    name: str
    kind: Literal["counter", "gauge"]
    help: str
    samples: tuple[tuple[tuple[str, ...], Key], ...]
    labels: tuple[str, ...] = ()


def _counter(name: str, help: str, *key: str) -> Stat:
    return Stat(name, "counter", help, (((), key),))


def _gauge(name: str, help: str, *key: str) -> Stat:
    return Stat(name, "gauge", help, (((), key),))


READ_PATH: tuple[Stat, ...] = (
    _counter("depot_cache_hits_total",
             "Pages served from the page store (short-circuit reads of local clients included).",
             "hits"),
    _counter("depot_cache_misses_total",
             "Pages a read had to fetch from the under store.", "misses"),
    Stat("depot_read_bytes_total", "counter",
         "Bytes served to readers, by where they came from: the page store (cache) or the "
         "under store (ufs).",
         ((("cache",), ("bytes_from_cache",)), (("ufs",), ("bytes_from_ufs",))),
         labels=("source",)),
    _counter("depot_short_circuit_hits_total",
             "Pages local clients read from the page files themselves (also in "
             "depot_cache_hits_total).", "short_circuit_hits"),
    _counter("depot_short_circuit_bytes_total",
             "Bytes local clients read from the page files themselves (also in "
             "depot_read_bytes_total{source=\"cache\"}).", "short_circuit_bytes"),
    _counter("depot_ufs_reads_total",
             "Page fetches sent to the under store (reads, read-ahead and loads).", "ufs_reads"),
    _counter("depot_ufs_shared_reads_total",
             "Page reads that joined a fetch already in flight instead of sending their own.",
             "ufs_read_shared"),
    _counter("depot_ufs_streamed_reads_total",
             "Page fetches streamed to their readers as the bytes arrived, so the first byte did "
             "not wait for the whole page (also in depot_ufs_reads_total).", "ufs_streamed"),
    _gauge("depot_ufs_inflight_reads",
           "Page fetches from the under store in flight now.", "ufs_inflight"),
    _counter("depot_stale_files_dropped_total",
             "File versions whose pages were dropped because revalidation found a new version.",
             "stale_dropped_files"),
    _counter("depot_metadata_hits_total",
             "Status and listing lookups answered by the metadata cache.", "metadata", "hits"),
    _counter("depot_metadata_misses_total",
             "Status and listing lookups the metadata cache could not answer.",
             "metadata", "misses"),
    _counter("depot_metadata_revalidations_total",
             "File statuses fetched from the under store.", "metadata", "revalidations"),
    _counter("depot_loaded_pages_total",
             "Pages fetched into the cache by load (preload) requests.", "loaded_pages"),
    _counter("depot_loaded_bytes_total",
             "Bytes fetched into the cache by load (preload) requests.", "loaded_bytes"),
    _counter("depot_freed_pages_total", "Pages dropped by free requests.", "freed_pages"),
)

PAGE_STORE: tuple[Stat, ...] = (
    _gauge("depot_cache_used_bytes",
           "Bytes the page files take on the cache disks (reserved for writes in flight "
           "included).", "used_bytes"),
    _gauge("depot_cache_capacity_bytes", "Sum of the cache dirs' quotas.", "capacity_bytes"),
    _gauge("depot_cache_pages", "Pages in the page store.", "pages"),
    _counter("depot_cache_evictions_total", "Pages evicted to make room.", "evictions"),
    _counter("depot_cache_evicted_bytes_total",
             "Bytes of the pages evicted to make room.", "evicted_bytes"),
    _counter("depot_cache_corrupt_pages_total",
             "Pages dropped because they failed their checksum (the read went to the under "
             "store).", "corrupt_dropped"),
    _counter("depot_cache_rejected_pages_total",
             "Pages not cached because they are larger than any cache dir's quota.",
             "rejected_pages"),
    _counter("depot_cache_direct_write_bytes_total",
             "Bytes of pages written with O_DIRECT, around the OS page cache (preloads).",
             "direct_write_bytes"),
    _gauge("depot_cache_memory_bytes",
           "Bytes of verified pages the memory tier holds.", "memory_bytes"),
    _gauge("depot_cache_memory_capacity_bytes",
           "The memory tier's size (cache.memory_size).", "memory_capacity_bytes"),
    _gauge("depot_cache_memory_pages", "Pages the memory tier holds.", "memory_pages"),
    _counter("depot_cache_memory_hits_total",
             "Page reads answered from the memory tier (no page file read).", "memory_hits"),
)

WRITES: tuple[Stat, ...] = (
    _counter("depot_writes_total",
             "Whole-file writes acknowledged (every write mode).", "writes", "writes"),
    _counter("depot_written_bytes_total",
             "Bytes of the acknowledged whole-file writes.", "writes", "bytes_written"),
    _counter("depot_multipart_writes_total",
             "Writes sent to the under store as multipart uploads.", "writes", "multipart_writes"),
    _counter("depot_local_writes_total",
             "Write-back writes staged by a writer on this node itself (local writes).",
             "writes", "local_writes"),
    _counter("depot_write_failures_total",
             "Writes that failed (nothing acknowledged).", "writes", "failed"),
    _counter("depot_write_cached_pages_total",
             "Pages of written files put in the cache (cache-through).", "writes", "pages_cached"),
    _counter("depot_deletes_total", "Files deleted.", "writes", "deletes"),
    _counter("depot_renames_total", "Files renamed.", "writes", "renames"),
)

WRITEBACK: tuple[Stat, ...] = (
    _gauge("depot_writeback_dirty_bytes",
           "Bytes acknowledged and staged on local disk, not in the under store yet.",
           "writeback", "dirty_bytes"),
    _gauge("depot_writeback_dirty_files",
           "Acknowledged writes (file versions) not in the under store yet, failed ones "
           "included.", "writeback", "queue_length"),
    _gauge("depot_writeback_uploads_in_progress",
           "Uploads running now (retry back-off included).", "writeback", "uploading"),
    _gauge("depot_writeback_oldest_dirty_age_seconds",
           "Age of the oldest write not in the under store yet; 0 when none is pending.",
           "writeback", "oldest_dirty_age"),
    _counter("depot_writeback_staged_total",
             "Writes acknowledged into write-back staging.", "writeback", "staged"),
    _counter("depot_writeback_staged_bytes_total",
             "Bytes acknowledged into write-back staging.", "writeback", "staged_bytes"),
    _counter("depot_writeback_uploaded_total",
             "Write-back writes uploaded to the under store.", "writeback", "uploaded"),
    _counter("depot_writeback_uploaded_bytes_total",
             "Bytes of write-back writes uploaded to the under store.",
             "writeback", "uploaded_bytes"),
    _counter("depot_writeback_upload_retries_total",
             "Upload attempts that failed with a retryable error and were tried again.",
             "writeback", "retries"),
    _counter("depot_writeback_upload_failures_total",
             "Uploads given up on (retries spent, or a permanent error); the write stays "
             "staged for the operator.", "writeback", "upload_failures"),
    _counter("depot_writeback_superseded_total",
             "Pending writes dropped because a newer write of the same path came.",
             "writeback", "superseded"),
    _counter("depot_writeback_abandoned_total",
             "Failed writes an operator gave up on.", "writeback", "abandoned"),
)
# Computed from the write-back document rather than read from one key.
WRITEBACK_QUEUE_DEPTH = "depot_writeback_upload_queue_depth"
WRITEBACK_FAILED = "depot_writeback_failed_writes"
FAILED_STATES = ("failed", "lost")

STATS: tuple[Stat, ...] = READ_PATH + PAGE_STORE + WRITES + WRITEBACK


def _lookup(doc: Mapping[str, Any], key: Key) -> float | None:
    value: Any = doc
    for part in key:
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _family(stat: Stat) -> CounterMetricFamily | GaugeMetricFamily:
    if stat.kind == "counter":
        return CounterMetricFamily(stat.name, stat.help, labels=stat.labels)
    return GaugeMetricFamily(stat.name, stat.help, labels=stat.labels)


class WorkerCollector(Collector):
    """Reads the worker's stats document at scrape time and yields it as metric families.

    A value missing from the document (a section not running, such as the write-back queue)
    leaves its metric out rather than exporting a made-up zero.
    """

    def __init__(self, *, worker_id: str, version: str, stats: StatsSource) -> None:
        self.worker_id = worker_id
        self.version = version
        self._stats = stats

    def describe(self) -> Iterable[Metric]:
        """Every family this collector can yield, so the registry refuses clashing names."""
        yield self._info()
        for stat in STATS:
            yield _family(stat)
        yield GaugeMetricFamily(WRITEBACK_QUEUE_DEPTH, "", labels=())
        yield GaugeMetricFamily(WRITEBACK_FAILED, "", labels=("state",))

    def collect(self) -> Iterable[Metric]:
        doc = self._stats()
        yield self._info()
        for stat in STATS:
            family = _family(stat)
            found = False
            for labels, key in stat.samples:
                value = _lookup(doc, key)
                if value is not None:
                    family.add_metric(list(labels), value)
                    found = True
            if found:
                yield family
        writeback = doc.get("writeback")
        if isinstance(writeback, Mapping):
            yield from self._writeback(writeback)

    def _info(self) -> InfoMetricFamily:
        return InfoMetricFamily(
            "depot_worker",
            "This worker's identity (its persisted id) and depot version; the value is 1.",
            value={"worker_id": self.worker_id, "version": self.version},
        )

    @staticmethod
    def _writeback(doc: Mapping[str, Any]) -> Iterator[Metric]:
        failures = doc.get("failures") or []
        by_state = dict.fromkeys(FAILED_STATES, 0)
        for failure in failures:
            state = failure.get("state") if isinstance(failure, Mapping) else None
            if state in by_state:
                by_state[state] += 1
        failed = GaugeMetricFamily(
            WRITEBACK_FAILED,
            "Write-back writes that stopped retrying and wait for an operator (retry or "
            "abandon): failed (the under store refused) or lost (staging file missing or "
            "corrupt).",
            labels=("state",),
        )
        for state, count in by_state.items():
            failed.add_metric([state], count)
        yield failed
        pending = _lookup(doc, ("queue_length",))
        uploading = _lookup(doc, ("uploading",))
        if pending is not None and uploading is not None:
            yield GaugeMetricFamily(
                WRITEBACK_QUEUE_DEPTH,
                "Write-back writes waiting for an uploader (not running, not failed).",
                value=max(0.0, pending - uploading - len(failures)),
            )


class GatewayCollector(Collector):
    """The S3 gateway's counters (``S3Gateway.stats``), read when Prometheus scrapes."""

    def __init__(self, stats: StatsSource) -> None:
        self._stats = stats

    def describe(self) -> Iterable[Metric]:
        return self._families({})

    def collect(self) -> Iterable[Metric]:
        return self._families(self._stats())

    @staticmethod
    def _families(doc: Mapping[str, Any]) -> list[Metric]:
        requests = CounterMetricFamily(
            "depot_s3_requests",
            "S3 requests the gateway dispatched, by operation (CopyObject and UploadPartCopy "
            "counted as such).", labels=("operation",))
        for operation, count in sorted((doc.get("requests") or {}).items()):
            requests.add_metric([operation], count)
        errors = CounterMetricFamily(
            "depot_s3_errors",
            "S3 error answers (4xx/5xx) by S3 error code, requests refused before dispatch "
            "(auth, SlowDown) included.", labels=("code",))
        for code, count in sorted((doc.get("errors") or {}).items()):
            errors.add_metric([code], count)
        return [
            requests,
            errors,
            CounterMetricFamily(
                "depot_s3_redirects",
                "GetObject requests answered 307 to the owner worker's gateway "
                "(s3.redirect_reads).", value=doc.get("redirects", 0)),
            GaugeMetricFamily(
                "depot_s3_inflight_requests",
                "S3 requests being served now (over s3.max_inflight: SlowDown).",
                value=doc.get("inflight", 0)),
        ]


class GatewayMetrics:
    """Registers a gateway's collector in a worker's registry (so ``GET /metrics`` of the
    worker shows it) until ``close``."""

    def __init__(self, registry: CollectorRegistry, stats: StatsSource) -> None:
        self.registry = registry
        self.collector = GatewayCollector(stats)
        registry.register(self.collector)

    def close(self) -> None:
        with contextlib.suppress(KeyError):  # already closed
            self.registry.unregister(self.collector)


class WorkerMetrics:
    """A worker's metrics: the collector over its counters and the request-duration histogram,
    registered in ``registry`` (one per worker, so test clusters in one process do not clash)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        worker_id: str,
        version: str,
        stats: StatsSource,
    ) -> None:
        self.registry = registry
        self.collector = WorkerCollector(worker_id=worker_id, version=version, stats=stats)
        registry.register(self.collector)
        try:
            self._duration = Histogram(
                REQUEST_DURATION,
                "Time from a request's arrival at its route to the last byte of its answer "
                "handed to the socket, by route.",
                labelnames=("route",),
                buckets=DURATION_BUCKETS,
                registry=registry,
            )
        except BaseException:
            registry.unregister(self.collector)
            raise
        # route -> its histogram child: ``labels()`` takes a lock and builds a key per call.
        self._routes: dict[str, Histogram] = {}

    def observe_request(self, route: str, seconds: float) -> None:
        """Record one request. ``route`` must come from a fixed set (templates, not raw paths),
        or the number of series grows without bound."""
        child = self._routes.get(route)
        if child is None:
            child = self._routes[route] = self._duration.labels(route)
        child.observe(seconds)

    def render(self) -> bytes:
        """The text exposition of every metric in the registry (``content_type``)."""
        return generate_latest(self.registry)

    def close(self) -> None:
        """Take this worker's metrics out of the registry (a restarted worker registers anew)."""
        for collector in (self.collector, self._duration):
            with contextlib.suppress(KeyError):  # already closed
                self.registry.unregister(collector)
