"""The worker process: builds the page store, metadata cache, mounts and HTTP server from config."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from depot import __version__
from depot.core.buffers import keep_freed_blocks
from depot.core.config import DepotConfig
from depot.core.errors import ConfigError
from depot.metastore import MetadataStore
from depot.namespace.mounts import Mount, MountTable
from depot.observability.metrics import WorkerMetrics
from depot.pagestore.direct import PageFiles
from depot.pagestore.local import LocalPageStore
from depot.placement.membership import ClusterStore, Membership
from depot.ufs.base import UnderStore
from depot.ufs.registry import open_under_store
from depot.worker.app import WorkerApp, cache_stats_document
from depot.worker.cluster import ClusterNode
from depot.worker.http import HttpServer
from depot.worker.jobs import FileJobStore, JobRunner
from depot.worker.lanes import HotLanes
from depot.worker.service import ReadThroughService
from depot.worker.writeback import WriteBackConfig, WriteBackQueue
from depot.worker.writes import WriteService

log = logging.getLogger(__name__)


def load_worker_id(cache_root: Path) -> str:
    """The worker's identity, kept in its cache dir so a restart keeps its place and its cache."""
    cache_root.mkdir(parents=True, exist_ok=True)
    id_file = cache_root / "worker-id"
    try:
        text = id_file.read_text().strip()
        return str(uuid.UUID(text))
    except (FileNotFoundError, ValueError):
        worker_id = str(uuid.uuid4())
        tmp = id_file.with_suffix(".tmp")
        tmp.write_text(worker_id + "\n")
        tmp.replace(id_file)
        return worker_id


class Worker:
    """One depot worker: start it, read ``endpoint``, stop it."""

    def __init__(
        self,
        config: DepotConfig,
        *,
        membership: Membership | None = None,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        """``membership``: one to join instead of the one the config names (test clusters).
        ``metrics_registry``: where this worker's metrics go (``GET /metrics`` renders it);
        by default a registry of its own, so workers sharing a process never clash."""
        if not config.mounts:
            raise ConfigError("no mounts configured: give --ufs URI or a 'mounts:' section")
        self.config = config
        self.mounts = MountTable.from_config(config.mounts)
        self.server: HttpServer | None = None
        self.lanes: HotLanes | None = None
        self.service: ReadThroughService | None = None
        self.port: int | None = None
        self.worker_id = ""
        self._pages: LocalPageStore | None = None
        self._metadata: MetadataStore | None = None
        self.cluster: ClusterNode | None = None
        self.jobs: JobRunner | None = None
        self.writeback: WriteBackQueue | None = None
        self._membership = membership
        self.metrics_registry = (
            metrics_registry if metrics_registry is not None else CollectorRegistry()
        )
        self.metrics: WorkerMetrics | None = None

    @property
    def advertised_endpoint(self) -> str:
        """The URL other workers and clients reach this worker at."""
        return self.config.cluster.advertise or self.endpoint

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("worker not started")
        host = self.config.worker.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def _open_store(self, mount: Mount) -> UnderStore:
        return open_under_store(mount.ufs_uri, mount.options, self.config.ufs)

    async def start(self) -> None:
        cfg = self.config
        if cfg.worker.keep_freed_blocks:
            keep_freed_blocks(one_heap=True)
        cache_root = cfg.cache.dirs[0].path
        # Fail fast on bad mount options/URIs, before anything is opened or logged; the
        # stores opened here are the ones the service uses.
        stores = {mount.path: self._open_store(mount) for mount in self.mounts.mounts}
        self.worker_id = load_worker_id(cache_root)
        self._pages = await LocalPageStore.open_from_config(cfg.cache)
        try:
            self._metadata = MetadataStore(
                cfg.cache.metadata_path, memory_entries=cfg.cache.metadata_memory_entries
            )
            self.service = ReadThroughService(
                self.mounts,
                self._pages,
                self._metadata,
                lambda mount: stores.get(mount.path) or self._open_store(mount),
                ufs_concurrency=cfg.worker.ufs_concurrency,
                prefetch_pages=cfg.worker.prefetch_pages,
                load_bypass_os_cache=cfg.cache.preload_direct_io,
                segment_size=0 if cfg.cluster.membership == "embedded" else cfg.cluster.segment_size,
            )
            writes = WriteService(
                self.service, multipart_threshold=cfg.worker.write_multipart_threshold
            )
            await self._open_writeback(writes)
            service = self.service
            self.metrics = WorkerMetrics(
                self.metrics_registry,
                worker_id=self.worker_id,
                version=__version__,
                stats=lambda: self._stats_document(service, writes),
            )
            app = WorkerApp(
                self.service,
                worker_id=self.worker_id,
                max_request_bytes=cfg.worker.max_request_bytes,
                cluster_view=lambda: self._cluster_node().view,
                writes=writes,
                metrics=self.metrics,
            )
            self.server = HttpServer(
                app, streaming=app.streams, max_stream_bytes=cfg.worker.max_write_bytes
            )
            self.port = await self.server.start(cfg.worker.host, cfg.worker.port)
            if cfg.worker.hot_lanes and self._pages is not None:
                self.lanes = app.lanes = HotLanes(
                    app,
                    PageFiles([d.path for d in self._pages.dir_stats()], cfg.cache.page_size),
                    self.server.adopt,
                    count=cfg.worker.hot_lanes,
                    page_size=cfg.cache.page_size,
                    idle_timeout=self.server.idle_timeout,
                    head_timeout=self.server.head_timeout,
                    pages=self._pages,
                )
            pages = self._pages
            self.cluster = ClusterNode(
                cfg.cluster,
                worker_uuid=self.worker_id,
                endpoint=self.advertised_endpoint,
                page_size=cfg.cache.page_size,
                mounts=list(cfg.mounts),
                usage=lambda: (pages.stats().used_bytes, pages.stats().capacity_bytes),
                membership=self._membership,
            )
            await self.cluster.start()
            self.jobs = self._job_runner(self.cluster, cache_root)
            await self.jobs.start()
            app.jobs = self.jobs
        except BaseException:
            await self.stop()
            raise
        log.info(
            "worker %s listening on %s (ring id %s, membership %s)",
            self.worker_id,
            self.endpoint,
            self.cluster.worker_id,
            cfg.cluster.membership,
        )

    async def _open_writeback(self, writes: WriteService) -> None:
        """Open the write-back queue: its journal is replayed, so writes acknowledged before a
        crash are uploaded now. Opened on every worker (a journal left by an earlier config
        still drains); only ``write-back`` mounts stage into it."""
        wb = self.config.writeback
        settings = WriteBackConfig(
            concurrency=wb.concurrency,
            part_size=wb.part_size,
            multipart_threshold=wb.multipart_threshold,
            bandwidth_limit=float(wb.bandwidth) if wb.bandwidth else None,
            max_attempts=wb.max_attempts,
            staging_quota=wb.quota,
            on_full=wb.on_full,
            full_wait_timeout=wb.full_wait,
            slot_ttl=wb.local_write_ttl,
            defer_uploads=wb.defer_uploads,
        )
        self.writeback = await WriteBackQueue.open(
            wb.staging_dir(self.config.cache),
            writes.store_for_uri,
            settings,
            on_uploaded=writes.on_uploaded,
        )
        writes.attach_writeback(self.writeback, sync_timeout=wb.sync_timeout)

    def _job_runner(self, node: ClusterNode, cache_root: Path) -> JobRunner:
        """Jobs live in the cluster's store when it is shared (etcd, or an embedded registry
        handed in); otherwise (one node, a static list) in files of the cache dir, so that a
        restarted worker still resumes them."""
        assert self.service is not None
        store: ClusterStore | None = node.store
        shared = store is not None and (
            self.config.cluster.membership == "etcd" or self._membership is not None
        )
        if store is None or not shared:
            store = FileJobStore(cache_root / "jobs")
        return JobRunner(
            self.service,
            view=lambda: node.view,
            store=store,
            worker_id=node.worker_id,
            endpoint=node.endpoint,
            shared_store=shared,
            stale_after=max(30.0, 3 * self.config.cluster.lease_ttl),
        )

    def _stats_document(self, service: ReadThroughService, writes: WriteService) -> dict[str, Any]:
        """The cache counters for metrics, with the reads hot lanes served so far in them."""
        if self.lanes is not None:
            self.lanes.flush_accounts()
        return cache_stats_document(service, writes)

    def _cluster_node(self) -> ClusterNode:
        if self.cluster is None:
            raise RuntimeError("worker not started")
        return self.cluster

    async def stop(self) -> None:
        if self.jobs is not None:
            # Running jobs stay active in the store: this worker (or another) resumes them.
            await self.jobs.stop()
            self.jobs = None
        if self.cluster is not None:
            # Leave the ring first, so that clients stop routing here before the port closes.
            await self.cluster.stop()
            self.cluster = None
        if self.server is not None:
            await self.server.stop()
            self.server = None
        if self.lanes is not None:
            await self.lanes.stop()
            self.lanes = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.writeback is not None:
            # Pending writes stay staged and journaled: the next start uploads them.
            await self.writeback.close()
            self.writeback = None
        if self.service is not None:
            await self.service.close()
            self.service = None
        if self._pages is not None:
            await self._pages.close()
            self._pages = None
        if self._metadata is not None:
            self._metadata.close()
            self._metadata = None

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.stop())
