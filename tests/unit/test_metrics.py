"""Worker metrics: the collector exports the worker's own counters at scrape time (the same
document as ``/api/v1/cache/stats``), request durations go to a histogram by a bounded route set,
and everything lives in the registry the caller passes in."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from depot.core.errors import NotFound, PermissionDenied
from depot.core.types import ByteRange
from depot.metastore.store import MetadataStore
from depot.namespace.mounts import Mount, MountTable
from depot.observability.metrics import (
    REQUEST_DURATION,
    STATS,
    WorkerMetrics,
)
from depot.pagestore.memory import MemoryPageStore
from depot.ufs import FaultInjectingUnderStore, MemoryUnderStore
from depot.ufs.memory import MemoryBucket
from depot.worker.app import WorkerApp, cache_stats_document
from depot.worker.http import Request
from depot.worker.service import ReadThroughService
from depot.worker.writeback import WriteBackConfig, WriteBackQueue
from depot.worker.writes import WriteService

PAGE = 4096
SIZE = 2 * PAGE + 100  # three pages, the last one short


@dataclass
class Node:
    """A worker's read and write services over in-memory stores, with its metrics."""

    service: ReadThroughService
    writes: WriteService
    queue: WriteBackQueue
    upload_store: FaultInjectingUnderStore
    registry: CollectorRegistry
    metrics: WorkerMetrics

    def doc(self) -> dict[str, Any]:
        return cache_stats_document(self.service, self.writes)

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    bucket = MemoryBucket()
    bucket.store("f.bin", bytes(range(256)) * (SIZE // 256) + bytes(SIZE % 256))
    ufs = MemoryUnderStore(bucket)
    meta = MetadataStore(tmp_path / "meta")
    service = ReadThroughService(
        MountTable([Mount("/", "memory://b")]),
        MemoryPageStore(1 << 20, page_size=PAGE),
        meta,
        lambda mount: ufs,
    )
    writes = WriteService(service)
    upload_store = FaultInjectingUnderStore(MemoryUnderStore())
    queue = await WriteBackQueue.open(
        tmp_path / "wb", lambda uri: upload_store,
        WriteBackConfig(backoff_base=0.001, backoff_max=0.01),
    )
    writes.attach_writeback(queue)
    registry = CollectorRegistry()
    metrics = WorkerMetrics(
        registry, worker_id="w-1", version="9.9", stats=lambda: cache_stats_document(service, writes)
    )
    yield Node(service, writes, queue, upload_store, registry, metrics)
    metrics.close()
    await queue.close()
    await service.close()
    meta.close()


async def _read_all(service: ReadThroughService, path: str) -> bytes:
    opened = await service.open(path)
    out = bytearray()
    chunks = service.read_chunks(opened, ByteRange(0, opened.status.size), bytearray(PAGE))
    async for chunk in chunks:
        out += chunk
    return bytes(out)


async def _wait_cached(service: ReadThroughService, pages: int) -> None:
    """Filled pages reach the page store in the background; wait until they have."""
    for _ in range(500):
        if service.pages.stats().pages >= pages:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{pages} pages were not cached in time")


async def test_counters_are_read_at_scrape_time(node: Node) -> None:
    assert node.value("depot_cache_hits_total") == 0
    assert node.value("depot_cache_misses_total") == 0
    data = await _read_all(node.service, "/f.bin")
    await _wait_cached(node.service, 3)
    # No re-registration, no per-read hook: the next scrape sees the service's counters.
    assert node.value("depot_cache_misses_total") == 3
    assert node.value("depot_cache_hits_total") == 0
    assert node.value("depot_read_bytes_total", source="ufs") == SIZE
    assert node.value("depot_read_bytes_total", source="cache") == 0
    assert await _read_all(node.service, "/f.bin") == data
    assert node.value("depot_cache_hits_total") == 3
    assert node.value("depot_cache_misses_total") == 3
    assert node.value("depot_read_bytes_total", source="cache") == SIZE
    assert node.value("depot_read_bytes_total", source="ufs") == SIZE
    assert node.value("depot_ufs_reads_total") == 3
    # The first page of the cold read went to the reader as it arrived (streamed).
    assert node.value("depot_ufs_streamed_reads_total") == node.service.stats.ufs_streamed == 1
    assert node.value("depot_ufs_inflight_reads") == 0
    assert node.value("depot_cache_pages") == 3
    store = node.service.pages.stats()
    assert node.value("depot_cache_used_bytes") == store.used_bytes > 0
    assert node.value("depot_cache_capacity_bytes") == store.capacity_bytes == 1 << 20
    # Short-circuit hits reported by a local client count as hits and cache bytes.
    node.service.record_short_circuit(2, 5000)
    assert node.value("depot_cache_hits_total") == 5
    assert node.value("depot_short_circuit_hits_total") == 2
    assert node.value("depot_short_circuit_bytes_total") == 5000
    assert node.value("depot_read_bytes_total", source="cache") == SIZE + 5000


async def test_loads_and_frees_are_counted(node: Node) -> None:
    opened = await node.service.open("/f.bin")
    result = await node.service.load_range(opened, 0, SIZE)
    assert result["loaded"] == 3
    assert node.value("depot_loaded_pages_total") == 3
    assert node.value("depot_loaded_bytes_total") == SIZE
    assert node.value("depot_cache_misses_total") == 0  # a load is not a read
    freed = await node.service.free("/f.bin")
    assert node.value("depot_freed_pages_total") == freed["pages"] == 3
    assert node.value("depot_cache_pages") == 0


async def test_every_metric_matches_the_stats_document(node: Node) -> None:
    """The table of metrics and the document the worker serves agree on every key: a renamed
    counter shows up here as a missing metric, not as a silently absent series."""
    await _read_all(node.service, "/f.bin")
    await node.queue.stage("/w", "w", b"x" * 10)
    # No await from here on: background fills and uploads cannot move a counter in between.
    doc = node.doc()
    for stat in STATS:
        for labels, key in stat.samples:
            value: Any = doc
            for part in key:
                value = value[part]
            exported = node.value(stat.name, **dict(zip(stat.labels, labels, strict=True)))
            assert exported is not None, f"{stat.name} is missing"
            # Gauges like the dirty age move between the two reads; the rest are equal.
            if stat.name != "depot_writeback_oldest_dirty_age_seconds":
                assert exported == value, stat.name


async def test_writeback_state(node: Node) -> None:
    node.upload_store.fail_next(1, PermissionDenied("denied"), ops={"put"})
    await node.queue.stage("/d", "d", b"keep me")
    with pytest.raises(PermissionDenied):
        await node.queue.sync(timeout=5)
    assert node.value("depot_writeback_dirty_bytes") == 7
    assert node.value("depot_writeback_dirty_files") == 1
    assert node.value("depot_writeback_failed_writes", state="failed") == 1
    assert node.value("depot_writeback_failed_writes", state="lost") == 0
    assert node.value("depot_writeback_upload_queue_depth") == 0  # failed, not waiting
    assert node.value("depot_writeback_uploads_in_progress") == 0
    age = node.value("depot_writeback_oldest_dirty_age_seconds")
    assert age is not None and age >= 0
    assert node.value("depot_writeback_staged_bytes_total") == 7
    assert node.value("depot_writeback_uploaded_bytes_total") == 0
    assert await node.queue.retry_failed() == 1
    await node.queue.sync(timeout=5)
    assert node.value("depot_writeback_dirty_bytes") == 0
    assert node.value("depot_writeback_dirty_files") == 0
    assert node.value("depot_writeback_failed_writes", state="failed") == 0
    assert node.value("depot_writeback_oldest_dirty_age_seconds") == 0
    assert node.value("depot_writeback_uploaded_total") == 1
    assert node.value("depot_writeback_uploaded_bytes_total") == 7


async def test_queue_depth_counts_writes_waiting_for_an_uploader(tmp_path: Path) -> None:
    store = FaultInjectingUnderStore(MemoryUnderStore())
    queue = await WriteBackQueue.open(
        tmp_path / "wb", lambda uri: store, WriteBackConfig(concurrency=1), start=False
    )
    registry = CollectorRegistry()
    WorkerMetrics(registry, worker_id="w", version="v", stats=lambda: {"writeback": queue.stats()})
    for name in ("a", "b", "c"):
        await queue.stage(f"/{name}", name, b"12345")
    assert registry.get_sample_value("depot_writeback_upload_queue_depth") == 3
    assert registry.get_sample_value("depot_writeback_dirty_files") == 3
    assert registry.get_sample_value("depot_writeback_dirty_bytes") == 15
    await queue.close()


def test_sections_not_running_are_left_out() -> None:
    registry = CollectorRegistry()
    WorkerMetrics(registry, worker_id="abc", version="1.2.3", stats=lambda: {"hits": 4})
    families = {f.name: f for f in text_string_to_metric_families(_render(registry))}
    assert registry.get_sample_value("depot_cache_hits_total") == 4
    assert registry.get_sample_value("depot_worker_info", {"worker_id": "abc", "version": "1.2.3"}) == 1
    assert not [name for name in families if name.startswith("depot_writeback_")]
    assert "depot_cache_misses" not in families  # absent, not a made-up zero


def test_names_follow_prometheus_conventions(tmp_path: Path) -> None:
    doc: dict[str, Any] = {}
    for stat in STATS:
        for _, key in stat.samples:
            parent = doc
            for part in key[:-1]:
                parent = parent.setdefault(part, {})
            parent[key[-1]] = 1
    doc["writeback"]["failures"] = []
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, worker_id="w", version="v", stats=lambda: doc)
    metrics.observe_request("/api/v1/read", 0.001)
    families = list(text_string_to_metric_families(metrics.render().decode()))
    # The parser names a counter's family without its ``_total``.
    expected = {s.name.removesuffix("_total") for s in STATS} | {
        "depot_worker_info", "depot_writeback_upload_queue_depth", "depot_writeback_failed_writes",
        REQUEST_DURATION, REQUEST_DURATION + "_created",
    }
    assert {f.name for f in families} == expected
    for family in families:
        assert family.name.startswith("depot_"), family.name
        assert "_ratio" not in family.name  # ratios are computed in PromQL, not exported
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        else:
            assert not family.name.endswith("_total"), family.name
        if "bytes" in family.name:
            assert family.name.endswith("_bytes"), family.name
        if "seconds" in family.name:
            assert family.name.startswith(("depot_writeback_oldest", REQUEST_DURATION))


def test_request_durations_by_route() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, worker_id="w", version="v", stats=dict)
    for seconds in (0.0002, 0.003, 2.0):
        metrics.observe_request("/api/v1/read", seconds)
    metrics.observe_request("/api/v1/stat", 0.0004)

    def sample(suffix: str, route: str, **extra: str) -> float | None:
        return registry.get_sample_value(REQUEST_DURATION + suffix, {"route": route, **extra})

    assert sample("_count", "/api/v1/read") == 3
    assert sample("_sum", "/api/v1/read") == pytest.approx(2.0032)
    assert sample("_bucket", "/api/v1/read", le="0.00025") == 1
    assert sample("_bucket", "/api/v1/read", le="0.005") == 2
    assert sample("_bucket", "/api/v1/read", le="+Inf") == 3
    assert sample("_count", "/api/v1/stat") == 1


class _Writer:
    """The part of ResponseWriter the small routes use."""

    head_only = False

    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes, dict[str, str]]] = []

    def send(self, status: int, body: bytes, headers: Any = ()) -> None:
        self.sent.append((status, body, dict(headers)))


def _request(path: str, method: str = "GET") -> Request:
    return Request(method=method, target=path, path=path, query="", version="HTTP/1.1", headers={})


async def test_app_times_every_request_under_a_bounded_route(node: Node) -> None:
    app = WorkerApp(node.service, worker_id="w-1", max_request_bytes=1 << 20, writes=node.writes,
                    metrics=node.metrics)
    assert app._route_label("/api/v1/read") == "/api/v1/read"
    assert app._route_label("/metrics") == "/metrics"
    assert app._route_label("/api/v1/jobs/abc123") == "/api/v1/jobs/{job_id}"
    assert app._route_label("/api/v1/jobs/abc123/stop") == "/api/v1/jobs/{job_id}/stop"
    assert app._route_label("/api/v1/jobs/a/b/c") == "other"
    assert app._route_label("/no/such/thing") == "other"
    await app(_request("/healthz"), _Writer())  # type: ignore[arg-type]
    with pytest.raises(NotFound):  # errors are timed too (the server answers them)
        await app(_request("/nope/1"), _Writer())  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        await app(_request("/nope/2"), _Writer())  # type: ignore[arg-type]
    writer = _Writer()
    await app(_request("/metrics"), writer)  # type: ignore[arg-type]
    status, body, headers = writer.sent[0]
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    assert f'{REQUEST_DURATION}_count{{route="/healthz"}} 1.0' in text
    assert f'{REQUEST_DURATION}_count{{route="other"}} 2.0' in text
    assert node.value(REQUEST_DURATION + "_count", route="/healthz") == 1


async def test_no_metrics_route_without_metrics(node: Node) -> None:
    app = WorkerApp(node.service, worker_id="w-1", max_request_bytes=1 << 20, writes=node.writes)
    with pytest.raises(NotFound):
        await app(_request("/metrics"), _Writer())  # type: ignore[arg-type]


def test_registry_is_the_callers() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    a = WorkerMetrics(first, worker_id="a", version="v", stats=lambda: {"hits": 1})
    WorkerMetrics(second, worker_id="b", version="v", stats=lambda: {"hits": 2})
    # Two workers in one process (test clusters) keep separate numbers; the global registry
    # stays untouched.
    assert first.get_sample_value("depot_cache_hits_total") == 1
    assert second.get_sample_value("depot_cache_hits_total") == 2
    assert REGISTRY.get_sample_value("depot_cache_hits_total") is None
    # One worker's metrics per registry: a second set clashes until the first is closed
    # (a restarted worker registers again).
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        WorkerMetrics(first, worker_id="c", version="v", stats=dict)
    assert first.get_sample_value("depot_cache_hits_total") == 1  # the failed one left nothing
    a.close()
    assert first.get_sample_value("depot_cache_hits_total") is None
    WorkerMetrics(first, worker_id="c", version="v", stats=lambda: {"hits": 3})
    assert first.get_sample_value("depot_cache_hits_total") == 3


def _render(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()
