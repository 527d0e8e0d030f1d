"""Which worker a client asks: the ring view, one connection pool per worker, and down marks.

The client learns the cluster from any worker (``GET /api/v1/cluster``) and refreshes it in the
background every ``cluster.refresh_interval``, and at once after a worker fails. A client whose
config names the cluster's etcd (``cluster.membership: etcd``) also watches the worker entries
there itself, so a worker that joins or leaves is routed to (or around) as soon as etcd says so;
the worker's document still gives the mounts and placement settings, and the last view is kept
while etcd is unreachable. Each read goes to
the worker that owns its bytes on the ring; a worker that refuses connections is skipped for a
growing while, so that readers do not each wait on a dead worker before moving on.

A worker too old to serve the cluster view, or a cluster view that cannot be had at all, leaves
the client talking to the one worker it was given, as before clusters existed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from depot.core.config import DepotConfig
from depot.core.errors import DepotError
from depot.core.transport import ConnectionPool, WorkerTimeout, WorkerUnreachable, parse_endpoint
from depot.placement.etcd import EtcdMembership
from depot.placement.membership import WorkerInfo
from depot.placement.view import ClusterView, spread_seed

log = logging.getLogger(__name__)

CLUSTER = "/api/v1/cluster"
HEALTH = "/healthz"
UNREACHABLE = (WorkerUnreachable, WorkerTimeout)
_DOWN_MIN = 1.0
_DOWN_MAX = 30.0


@dataclass(slots=True)
class _DownMark:
    until: float
    period: float


class WorkerRouter:
    """Routes requests to workers; not thread-safe (one event loop).

    ``targets``, ``is_down``, ``segment_end`` and ``view_is_current`` only read what is known,
    so readers in other threads may call them (the caller-thread and short-circuit reads).
    """

    def __init__(self, seed: str, config: DepotConfig, *, max_connections: int) -> None:
        self.seed = parse_endpoint(seed).url
        self.config = config
        self._max_connections = max_connections
        self._pools: dict[str, ConnectionPool] = {}
        self._probe_pools: dict[str, ConnectionPool] = {}
        self._probes: dict[str, asyncio.Future[None]] = {}
        self._alive_until: dict[str, float] = {}
        self._down: dict[str, _DownMark] = {}
        self._view: ClusterView | None = None
        self._view_at = 0.0
        self._no_cluster = False  # the seed worker serves no cluster view
        self._refreshing: asyncio.Task[None] | None = None
        # The etcd watch (clients configured with the cluster's etcd only).
        self._members: EtcdMembership | None = None
        self._members_start: asyncio.Task[None] | None = None
        self._members_unsubscribe: Callable[[], None] | None = None
        self._member_list: tuple[WorkerInfo, ...] | None = None
        self.spread = spread_seed(f"{os.getpid()}:{id(self)}")
        self.pool(self.seed)

    # pools ---------------------------------------------------------------------------------------
    def pool(self, endpoint: str) -> ConnectionPool:
        pool = self._pools.get(endpoint)
        if pool is None:
            settings = self.config.client
            pool = ConnectionPool(
                parse_endpoint(endpoint),
                max_connections=self._max_connections,
                connect_timeout=settings.connect_timeout,
                timeout=settings.timeout,
            )
            self._pools[endpoint] = pool
        return pool

    def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        if self._members_start is not None:
            self._members_start.cancel()
        if self._members_unsubscribe is not None:
            self._members_unsubscribe()
            self._members_unsubscribe = None
        for probe in self._probes.values():
            probe.cancel()
        for pool in [*self._pools.values(), *self._probe_pools.values()]:
            pool.close()
        self._pools.clear()
        self._probe_pools.clear()

    # liveness ------------------------------------------------------------------------------------
    def watch(self, endpoint: str) -> asyncio.TimerHandle | None:
        """Arm the hang check for one request to ``endpoint`` (cancel the handle when it ends).

        A slow answer is normal (a cold page from a slow store), so requests are not timed out
        early; instead, a request still running after ``probe_after`` makes the router ask the
        worker for ``/healthz`` on a connection of its own. A worker that does not answer
        (stopped, hung, cut off by a partition that resets nothing) has every request in flight
        to it failed at once, so readers move on in about ``probe_after + connect_timeout``
        rather than the whole ``client.timeout``. A timer, not a task, so the check costs the
        hot path next to nothing.
        """
        probe_after = self.config.client.probe_after
        if probe_after <= 0:
            return None
        return asyncio.get_running_loop().call_later(probe_after, self.suspect, endpoint)

    def suspect(self, endpoint: str) -> None:
        """Check ``endpoint`` in the background (one check at a time per worker)."""
        if endpoint in self._probes or self._alive_until.get(endpoint, 0.0) > time.monotonic():
            return
        check = asyncio.ensure_future(self._check(endpoint))
        self._probes[endpoint] = check
        check.add_done_callback(lambda _: self._probes.pop(endpoint, None))

    async def _check(self, endpoint: str) -> None:
        if await self._probe(endpoint):
            return
        error = WorkerTimeout(f"worker {endpoint} does not answer its health check")
        failed = self.pool(endpoint).fail_active(error)
        log.info("worker %s does not answer: failed %d request(s) in flight", endpoint, failed)
        self.mark_down(endpoint, error)

    async def _probe(self, endpoint: str) -> bool:
        settings = self.config.client
        pool = self._probe_pools.get(endpoint)
        if pool is None:
            pool = ConnectionPool(
                parse_endpoint(endpoint),
                max_connections=1,
                connect_timeout=settings.connect_timeout,
                timeout=settings.connect_timeout,
            )
            self._probe_pools[endpoint] = pool
        try:
            async with asyncio.timeout(settings.connect_timeout):
                response = await pool.request(HEALTH)
        except (*UNREACHABLE, TimeoutError):
            return False
        ok = response.status == 200
        if ok:
            self._alive_until[endpoint] = time.monotonic() + settings.probe_after
        return ok

    # down marks ----------------------------------------------------------------------------------
    def is_down(self, endpoint: str) -> bool:
        mark = self._down.get(endpoint)
        return mark is not None and time.monotonic() < mark.until

    def mark_down(self, endpoint: str, error: DepotError) -> None:
        """Skip ``endpoint`` for a while (doubling up to 30 s while it stays down)."""
        now = time.monotonic()
        mark = self._down.get(endpoint)
        if mark is not None and now < mark.until:
            return
        period = min(_DOWN_MAX, max(_DOWN_MIN, mark.period * 2 if mark else 0.0))
        self._down[endpoint] = _DownMark(now + period, period)
        log.info("worker %s unreachable (%s); skipping it for %.0fs", endpoint, error.message, period)
        self.refresh_soon()

    def failed(self, endpoint: str, error: WorkerUnreachable | WorkerTimeout) -> None:
        """A request to ``endpoint`` failed: skip a worker that refused the connection or sent
        nothing for the whole timeout (hung, or behind a partition), else refresh the view."""
        if error.connect_failed or isinstance(error, WorkerTimeout):
            self.mark_down(endpoint, error)
        else:
            self.refresh_soon()

    def mark_up(self, endpoint: str) -> None:
        if self._down.pop(endpoint, None) is not None:
            log.info("worker %s is reachable again", endpoint)

    # the view ------------------------------------------------------------------------------------
    @property
    def view(self) -> ClusterView | None:
        return self._view

    async def current_view(self) -> ClusterView | None:
        """The view, fetched on first use and refreshed in the background when old."""
        if self._no_cluster:
            return None
        if self._view is None:
            await self.refresh()
        elif time.monotonic() - self._view_at > self.config.cluster.refresh_interval:
            self.refresh_soon()
        return self._view

    def view_is_current(self) -> bool:
        """Whether routes may be taken without the event loop: the view is known and not due
        for a refresh (or the seed serves no cluster view). Fetching one is the loop's job."""
        if self._no_cluster:
            return True
        return self._view is not None and (
            time.monotonic() - self._view_at <= self.config.cluster.refresh_interval
        )

    def refresh_soon(self) -> None:
        if self._no_cluster or (self._refreshing is not None and not self._refreshing.done()):
            return
        with contextlib.suppress(RuntimeError):  # no running loop: the next call refreshes
            self._refreshing = asyncio.get_running_loop().create_task(self.refresh())

    async def refresh(self) -> None:
        """Fetch the view from the seed, else from any worker of the last view."""
        candidates = [self.seed]
        if self._view is not None:
            candidates += [w.endpoint for w in self._view.workers if w.endpoint != self.seed]
        candidates.sort(key=self.is_down)  # workers marked down last, still tried
        # The view is a small document any live worker serves at once: a hung worker (a
        # partition) must not hold the refresh for the whole read timeout.
        limit = self.config.client.connect_timeout
        for endpoint in candidates:
            try:
                async with asyncio.timeout(limit):
                    response = await self.pool(endpoint).request(CLUSTER)
                if response.status == 404 and endpoint == self.seed and self._view is None:
                    self._no_cluster = True
                    return
                if response.status != 200:
                    continue
                view = ClusterView.from_document(response.json(), reuse=self._view)
            except (*UNREACHABLE, TimeoutError):
                continue
            except (DepotError, ValueError) as exc:
                log.warning("worker %s sent an unusable cluster view: %s", endpoint, exc)
                continue
            if self._view is None or view.generation != self._view.generation or (
                view.workers != self._view.workers
            ):
                log.debug("cluster view from %s: %d worker(s)", endpoint, len(view.workers))
            self._view = self._with_members(view)
            self._view_at = time.monotonic()
            self._watch_etcd(view)
            return
        # Nobody answered: keep the last view (and try again on the next call).
        self._view_at = time.monotonic()

    # the etcd watch -----------------------------------------------------------------------------
    def _watch_etcd(self, view: ClusterView) -> None:
        """Start watching etcd in the background, when the config names it (once).

        The cluster watched is the one the worker's view names, so a client needs only the
        etcd endpoints. In the background, so that an unreachable etcd costs reads nothing: the
        view from the worker serves meanwhile.
        """
        cluster = self.config.cluster
        if (self._members is not None or cluster.membership != "etcd" or not cluster.etcd
                or view.membership != "etcd"):
            return
        try:
            self._members = EtcdMembership(cluster.etcd, cluster=view.cluster,
                                           lease_ttl=cluster.lease_ttl)
        except DepotError as exc:
            log.warning("not watching etcd: %s", exc)
            return
        self._members_start = asyncio.get_running_loop().create_task(self._start_watch())

    async def _start_watch(self) -> None:
        members = self._members
        assert members is not None
        try:
            await members.start()
        except (DepotError, OSError) as exc:  # the workers' views keep serving without it
            log.warning("not watching etcd: %s", exc)
            return
        self._members_unsubscribe = members.subscribe(self._on_members)

    def _on_members(self, workers: list[WorkerInfo]) -> None:
        self._member_list = tuple(workers)
        if self._view is not None:
            self._view = self._with_members(self._view)

    def _with_members(self, view: ClusterView) -> ClusterView:
        """``view`` with the workers this client's own etcd watch sees, while etcd answers."""
        members = self._members
        if not self._member_list or members is None or not members.healthy:
            return view  # no watch, etcd silent, or a listing with no worker: the worker's view
        if self._member_list == view.workers:
            return view
        return replace(view, workers=self._member_list, generation=members.generation,
                       reuse=view)

    async def aclose(self) -> None:
        """Close the pools and stop the etcd watch."""
        self.close()
        members, self._members = self._members, None
        if members is not None:
            await members.close(leave=False)

    # routing -------------------------------------------------------------------------------------
    def targets(self, path: str | None, offset: int = 0) -> list[str]:
        """Endpoints to try for ``path`` at ``offset``, best first (without waiting on anything).

        Workers marked down go to the end: they are tried only when nothing else is left.
        """
        view = self._view
        endpoints: list[str] = []
        if view is not None and path is not None:
            file_key = view.file_key(path)
            if file_key is not None:
                endpoints = [w.endpoint for w in view.route(file_key, offset, spread=self.spread)]
        if not endpoints:
            endpoints = [self.seed]
        up = [e for e in endpoints if not self.is_down(e)]
        return up + [e for e in endpoints if e not in up]

    def write_targets(self, path: str) -> list[str]:
        """Endpoints for a write of ``path``: the owner of its first segment first (no
        spreading over replicas), so that every writer of one path reaches the same worker."""
        view = self._view
        endpoints: list[str] = []
        if view is not None:
            file_key = view.file_key(path)
            if file_key is not None:
                endpoints = [w.endpoint for w in view.route(file_key, 0)]
        if not endpoints:
            endpoints = [self.seed]
        up = [e for e in endpoints if not self.is_down(e)]
        return up + [e for e in endpoints if e not in up]

    def segment_end(self, offset: int) -> int | None:
        """Where the placement segment of ``offset`` ends, if reads must be cut there."""
        if self._view is None:
            return None
        return self._view.segment_end(offset)


__all__ = ["CLUSTER", "UNREACHABLE", "WorkerRouter"]
