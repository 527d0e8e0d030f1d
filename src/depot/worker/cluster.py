"""This worker's place in the cluster: it registers, keeps the ring view and publishes its usage.

The view is rebuilt whenever membership pushes a change (etcd watch, static list, or the
embedded registry) and served at ``GET /api/v1/cluster`` so that clients without etcd access
route reads exactly as the workers do. Usage (bytes cached, capacity) is refreshed in the
membership entry every few seconds for ``depot status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable

from depot import __version__
from depot.core.config import ClusterConfig, MountConfig
from depot.core.errors import DepotError
from depot.placement.membership import (
    ClusterStore,
    EmbeddedMembership,
    EmbeddedRegistry,
    Membership,
    StaticMembership,
    WorkerInfo,
    normalize_endpoint,
    static_worker_id,
)
from depot.placement.ring import PlacementPolicy, WorkerIdentity
from depot.placement.view import ClusterView

log = logging.getLogger(__name__)

USAGE_INTERVAL = 5.0


def open_membership(config: ClusterConfig, registry: EmbeddedRegistry | None = None) -> Membership:
    """The membership the config names, not started yet."""
    if config.membership == "static":
        return StaticMembership(config.workers)
    if config.membership == "etcd":
        from depot.placement.etcd import EtcdMembership

        return EtcdMembership(config.etcd, cluster=config.name, lease_ttl=config.lease_ttl)
    return EmbeddedMembership(registry)


def ring_identity(worker_uuid: str, config: ClusterConfig, endpoint: str) -> str:
    """The id this worker takes on the ring.

    From its cache dir's persisted UUID (so a restart keeps its place and its cache), except in a
    static cluster, where every process derives ids from the configured URLs.
    """
    if config.membership == "static":
        return static_worker_id(endpoint)
    return str(WorkerIdentity(uuid.UUID(worker_uuid).bytes))


class ClusterNode:
    """Joins the cluster on ``start`` and leaves it on ``stop``."""

    def __init__(
        self,
        config: ClusterConfig,
        *,
        worker_uuid: str,
        endpoint: str,
        page_size: int,
        mounts: list[MountConfig],
        usage: Callable[[], tuple[int, int]],
        membership: Membership | None = None,
    ) -> None:
        self.config = config
        self.endpoint = endpoint
        if config.membership == "static":
            self.endpoint = normalize_endpoint(endpoint)
        self.worker_id = ring_identity(worker_uuid, config, self.endpoint)
        self.membership = membership if membership is not None else open_membership(config)
        self._page_size = page_size
        self._mounts = tuple(mounts)
        self._usage = usage
        self._policy = PlacementPolicy(
            segment_size=config.segment_size,
            replication=config.replication,
            virtual_nodes=config.virtual_nodes,
        )
        self._generation = 0
        self._view = self._build([])
        self._unsubscribe: Callable[[], None] | None = None
        self._usage_task: asyncio.Task[None] | None = None
        self._info: WorkerInfo | None = None
        # This worker's S3 gateway, once it listens (``advertise_s3``); "" while there is none.
        self.s3_endpoint = ""

    @property
    def view(self) -> ClusterView:
        """The current view (a snapshot; cheap to read on every request)."""
        healthy = self.membership.healthy
        if healthy != self._view.healthy:
            self._view = self._build(list(self._view.workers))
        return self._view

    @property
    def store(self) -> ClusterStore | None:
        """The shared KV for job state, when the membership backend has one."""
        return self.membership if isinstance(self.membership, ClusterStore) else None

    def _build(self, workers: list[WorkerInfo]) -> ClusterView:
        previous: ClusterView | None = getattr(self, "_view", None)
        return ClusterView(
            workers=tuple(workers),
            policy=self._policy,
            mounts=self._mounts,
            page_size=self._page_size,
            cluster=self.config.name,
            membership=self.config.membership,
            generation=self._generation,
            healthy=self.membership.healthy,
            self_id=self.worker_id,
            reuse=previous,
        )

    def _on_view(self, workers: list[WorkerInfo]) -> None:
        self._generation += 1
        self._view = self._build(workers)
        log.info(
            "cluster view %d: %d worker(s) (%s)",
            self._generation,
            len(workers),
            ", ".join(w.endpoint for w in workers) or "none",
        )

    def _current_info(self) -> WorkerInfo:
        used, capacity = self._usage()
        return WorkerInfo(
            worker_id=self.worker_id,
            endpoint=self.endpoint,
            capacity_bytes=capacity,
            used_bytes=used,
            started_at=time.time() if self._info is None else self._info.started_at,
            version=__version__,
            s3_endpoint=self.s3_endpoint,
        )

    async def start(self) -> None:
        await self.membership.start()
        self._unsubscribe = self.membership.subscribe(self._on_view)
        self._info = self._current_info()
        await self.membership.register(self._info)
        self._usage_task = asyncio.create_task(self._publish_usage(), name="depot-usage")

    async def advertise_s3(self, endpoint: str) -> None:
        """Publish the URL of this worker's S3 gateway in its membership entry, where gateways
        that redirect reads to a key's owner find it. A backend that cannot take it now gets it
        with the next usage update."""
        self.s3_endpoint = endpoint
        info = self._current_info()
        try:
            await self.membership.update(info)
            self._info = info
        except DepotError as exc:
            log.warning("could not advertise the S3 endpoint %s yet: %s", endpoint, exc)

    async def _publish_usage(self) -> None:
        while True:
            await asyncio.sleep(USAGE_INTERVAL)
            info = self._current_info()
            if self._info is not None and (
                info.used_bytes,
                info.capacity_bytes,
                info.s3_endpoint,
            ) == (self._info.used_bytes, self._info.capacity_bytes, self._info.s3_endpoint):
                continue
            try:
                await self.membership.update(info)
                self._info = info
            except DepotError as exc:  # the backend is down: keep serving, try again later
                log.debug("could not publish usage: %s", exc)

    async def stop(self) -> None:
        if self._usage_task is not None:
            self._usage_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._usage_task
            self._usage_task = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        with contextlib.suppress(DepotError):
            await self.membership.deregister(self.worker_id)
        await self.membership.close()
