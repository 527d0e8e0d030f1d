"""Membership and cluster KV on etcd v3: leases for liveness, a watch for the view.

Key layout (``<cluster>`` defaults to ``default``)::

    /depot/<cluster>/workers/<worker_id>   WorkerInfo JSON, attached to the instance's lease
    /depot/<cluster>/jobs/<job_id>         job state (reserved; written through the KV API)
    /depot/<cluster>/<key>                 any other ClusterStore key

Liveness. Each instance holds at most one lease (TTL ``lease_ttl``, whole seconds as etcd counts
them) and refreshes it every TTL/3; every worker it registers and every ``ephemeral`` KV entry is
attached to it. A process that dies stops refreshing and etcd deletes its entries when the lease
expires, so a dead worker leaves the view within the TTL without anyone deciding it is dead.

The view. The watch loop reads the prefix once and then watches from the revision *after* that
read, so no event between the two is lost; when the watch breaks (etcd down, revision compacted)
it reconnects with backoff and reads the prefix again. Until then the last view stays in memory
and ``workers()`` keeps serving it: routing reads on a slightly old ring is far better than
routing none.

The view never goes back in revision order. Each entry remembers the etcd revision it reflects
(a deleted one leaves a tombstone until the watch has passed its revision), and an event older
than that, or older than the revision the view is complete up to, is dropped: a watch stream
that is slow to die, or one that aetcd hands to the wrong caller (a watch created after its
create request timed out, delivering from its older start revision), cannot bring back an entry
that was replaced since. Own writes go into the view as soon as etcd acknowledged them, at the
revision etcd gave them, so ``register``/``update``/``deregister`` read their own writes on
return even when the watch lags under load; they then wait (bounded) for the watch to catch up
to that revision, so the rest of the view is as fresh as the write.

etcd down. Calls that need etcd (the KV API, deregistering another instance's worker) raise
``Unavailable``; ``register``/``update`` keep what they were asked and write it once etcd answers;
``healthy`` is False. The session loop keeps retrying; when etcd is back and the lease has expired
meanwhile, it takes a new lease and writes every registration again (ephemeral KV entries are not
rewritten: their owner lost its session and must notice). A lease that is still valid is simply
refreshed (etcd extends all leases by their TTL when it restarts).

Client: ``aetcd`` (asyncio, grpc.aio). TLS is not supported yet (aetcd only opens plain channels).
Several endpoints are tried in turn: on a connection failure the next call uses the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import aetcd

from depot.core.errors import ConfigError, InvalidArgument, NotFound, Unavailable
from depot.placement.membership import (
    WORKERS_PREFIX,
    ClusterStore,
    Membership,
    WorkerInfo,
    check_cluster_name,
    check_kv_key,
    check_kv_value,
)

__all__ = ["DEFAULT_LEASE_TTL", "EtcdMembership", "parse_etcd_endpoint"]

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL = 10.0
DEFAULT_PORT = 2379
MIN_LEASE_TTL = 2
"""etcd's own floor with its default timing (1.5 election timeouts, rounded up)."""

GRPC_OPTIONS: dict[str, Any] = {
    # grpc's default reconnect backoff grows to 120 s: after an etcd restart the channel would
    # stay down long after etcd is up. Keep retrying every second at most.
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    # Find a dead peer behind a silent network (no RST). etcd refuses pings more often than
    # every 5 s (its --grpc-keepalive-min-time), so stay above that.
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
}

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    aetcd.ConnectionFailedError,
    aetcd.ConnectionTimeoutError,
    aetcd.WatchTimeoutError,
    aetcd.rpc.AioRpcError,
    TimeoutError,
)


class _LeaseGone(Unavailable):
    """etcd no longer knows our lease (it expired while we could not refresh it)."""


def parse_etcd_endpoint(url: str) -> tuple[str, int]:
    """``http://host:port``, ``host:port`` or ``host`` (port 2379) to (host, port)."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme == "https":
        raise ConfigError(f"TLS to etcd is not supported yet: {url!r}")
    try:
        port: int = parts.port or DEFAULT_PORT
    except ValueError:
        raise ConfigError(f"invalid etcd endpoint {url!r}") from None
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(f"invalid etcd endpoint {url!r} (use http://host:port)")
    return parts.hostname, port


def _backoff(failures: int, cap: float) -> float:
    """0.1 s doubling per failure up to ``cap``, with jitter so peers do not retry in step."""
    base = min(cap, 0.1 * 2.0 ** max(0, failures - 1))
    return base * random.uniform(0.8, 1.0)


class EtcdMembership(Membership, ClusterStore):
    """Membership and ClusterStore of one cluster on etcd.

    ``endpoints``: etcd client URLs (``http://host:2379``). ``lease_ttl``: seconds after its
    last heartbeat that a silent worker leaves the view (rounded up to whole seconds, at least
    2). ``request_timeout``: the limit of one etcd call (default TTL/3, at most 5 s), so a
    stalled etcd cannot make a heartbeat miss its turn.
    """

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        cluster: str = "default",
        *,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        request_timeout: float | None = None,
    ) -> None:
        super().__init__()
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e.strip()]
        if not endpoints:
            raise ConfigError("etcd membership needs at least one etcd endpoint")
        self._endpoints = [parse_etcd_endpoint(e) for e in endpoints]
        self.cluster = check_cluster_name(cluster)
        if not lease_ttl > 0:
            raise ConfigError(f"lease_ttl must be positive, got {lease_ttl!r}")
        self.lease_ttl = max(MIN_LEASE_TTL, math.ceil(lease_ttl))
        self.heartbeat_interval = self.lease_ttl / 3
        self.request_timeout = (
            request_timeout if request_timeout else min(5.0, self.heartbeat_interval)
        )
        self.prefix = f"/depot/{self.cluster}/"
        self.workers_prefix = self.prefix + WORKERS_PREFIX
        self.sessions_lost = 0
        """How many times this instance found its lease expired (and registered again)."""

        self._client: Any = None
        self._endpoint_index = 0
        self._healthy = False
        self._lease_id: int | None = None
        self._wanted: dict[str, WorkerInfo] = {}  # registrations this instance keeps alive
        self._written: dict[str, bytes] = {}  # what is in etcd for them under the current lease
        self._pending_deletes: dict[str, bytes] = {}  # own entries to delete once etcd answers
        self._dirty = False  # some wanted entry may be missing from etcd
        self._session_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._view_revision = 0  # the view holds every change of etcd up to this revision
        self._revisions: dict[str, int] = {}  # per worker id: the revision its entry reflects
        self._tombstones: set[str] = set()  # ids of _revisions whose entry was deleted
        self._revision_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._first_sync = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closing = False
        self._closed = False

    # --- properties ----------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def lease_id(self) -> int | None:
        """The current lease (None before the first registration or after it was lost)."""
        return self._lease_id

    @property
    def endpoint(self) -> str:
        """The etcd endpoint in use now."""
        host, port = self._endpoints[self._endpoint_index]
        return f"http://{host}:{port}"

    def _worker_key(self, worker_id: str) -> bytes:
        return (self.workers_prefix + worker_id).encode()

    def _set_healthy(self, value: bool) -> None:
        if value != self._healthy:
            if value:
                log.info("etcd %s reachable again (cluster %s)", self.endpoint, self.cluster)
            else:
                log.warning(
                    "etcd %s unreachable (cluster %s): serving the last known view",
                    self.endpoint,
                    self.cluster,
                )
        self._healthy = value

    # --- connection ----------------------------------------------------------------------

    def _get_client(self) -> Any:
        if self._client is None:
            host, port = self._endpoints[self._endpoint_index]
            target_host = f"[{host}]" if ":" in host else host
            self._client = aetcd.Client(
                host=target_host,
                port=port,
                timeout=self.request_timeout,  # documented as int; grpc takes float seconds
                options=dict(GRPC_OPTIONS),
            )
        return self._client

    async def _connection_failed(self, client: Any) -> None:
        """Mark unhealthy; with several endpoints, move on to the next one."""
        self._set_healthy(False)
        if len(self._endpoints) > 1 and client is self._client and not self._closed:
            self._client = None
            self._endpoint_index = (self._endpoint_index + 1) % len(self._endpoints)
            await self._close_client(client)

    async def _close_client(self, client: Any) -> None:
        try:
            async with asyncio.timeout(self.request_timeout):
                await client.close()
        except Exception as exc:  # closing a broken channel may fail; nothing to do about it
            log.debug("closing etcd client: %r", exc)

    @contextlib.asynccontextmanager
    async def _rpc(self, what: str) -> AsyncIterator[Any]:
        """Yield the client; map aetcd/grpc errors to depot errors and track health."""
        if self._closed:
            raise Unavailable("etcd membership is closed")
        client = self._get_client()
        try:
            yield client
        except aetcd.RevisionCompactedError:
            raise
        except _CONNECTION_ERRORS as exc:
            await self._connection_failed(client)
            raise Unavailable(f"etcd {what} failed: {exc}") from exc
        except aetcd.InvalidArgumentError as exc:
            raise InvalidArgument(f"etcd refused {what}: {exc}") from exc
        except aetcd.ClientError as exc:
            if "lease not found" in str(exc):
                raise _LeaseGone(f"etcd {what}: {exc}") from exc
            raise Unavailable(f"etcd {what} failed: {exc}") from exc
        else:
            self._set_healthy(True)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the watch and session loops; wait (at most a request timeout) for the view."""
        if self._closed or self._closing:
            raise Unavailable("etcd membership is closed")
        if self._started:
            return
        self._started = True
        self._tasks = [
            asyncio.create_task(self._watch_loop(), name=f"depot-etcd-watch-{self.cluster}"),
            asyncio.create_task(self._session_loop(), name=f"depot-etcd-session-{self.cluster}"),
        ]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.request_timeout):
                await self._first_sync.wait()

    async def close(self, *, leave: bool = True) -> None:
        """Stop the loops; with ``leave`` revoke the lease so this instance's workers leave now.

        ``leave=False`` keeps the entries until the lease expires: a worker restarting within
        the TTL (an upgrade) keeps its place without the ring changing twice.
        """
        if self._closed or self._closing:
            return
        self._closing = True
        await self._stop_tasks()
        if leave and self._lease_id is not None:
            try:
                async with asyncio.timeout(self.request_timeout):
                    async with self._rpc("lease revoke") as client:
                        await client.revoke_lease(self._lease_id)
            except (Unavailable, TimeoutError) as exc:
                log.warning(
                    "could not revoke the etcd lease (entries expire in %ss): %s",
                    self.lease_ttl,
                    exc,
                )
        self._closed = True
        for _, fut in self._revision_waiters:
            if not fut.done():
                fut.set_result(None)
        if self._client is not None:
            client, self._client = self._client, None
            await self._close_client(client)

    async def _stop_tasks(self) -> None:
        """Cancel the loops, again if need be: on Python 3.11 ``asyncio.wait_for`` (used inside
        aetcd) can swallow a cancellation that lands just as its inner wait completes."""
        pending = {t for t in self._tasks if not t.done()}
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.1)
        for task in self._tasks:
            if not task.cancelled() and task.exception() is not None:
                log.error("etcd membership loop failed", exc_info=task.exception())
        self._tasks = []

    def _check_open(self) -> None:
        if self._closed or self._closing or not self._started:
            raise Unavailable("etcd membership is not started or already closed")

    # --- view ----------------------------------------------------------------------------

    def _parse_entry(self, key: bytes, value: bytes) -> tuple[str, WorkerInfo | None]:
        worker_id = bytes(key).decode("utf-8", "replace")[len(self.workers_prefix) :]
        try:
            info = WorkerInfo.from_json(bytes(value))
        except InvalidArgument as exc:
            log.warning("ignoring malformed worker entry %s: %s", worker_id, exc)
            return worker_id, None
        if info.worker_id != worker_id:
            log.warning("ignoring worker entry %s that names worker %s", worker_id, info.worker_id)
            return worker_id, None
        return worker_id, info

    def _advance(self, revision: int) -> None:
        """The view reflects etcd up to ``revision``: wake writers waiting to see their write."""
        if revision > self._view_revision:
            self._view_revision = revision
            # A tombstone at or below the view revision is covered by that revision: drop it.
            for worker_id in [w for w in self._tombstones if self._revisions[w] <= revision]:
                self._tombstones.discard(worker_id)
                del self._revisions[worker_id]
        keep: list[tuple[int, asyncio.Future[None]]] = []
        for wanted, fut in self._revision_waiters:
            if wanted <= self._view_revision:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((wanted, fut))
        self._revision_waiters = keep

    def _is_stale(self, worker_id: str, revision: int) -> bool:
        """Whether a change of ``worker_id`` at ``revision`` is older than what the view has.

        Equal revisions are not stale: one transaction may change several keys at one revision,
        and applying an event the view already reflects changes nothing.
        """
        return revision < self._view_revision or revision < self._revisions.get(worker_id, 0)

    def _set_entry(
        self, view: dict[str, WorkerInfo], worker_id: str, info: WorkerInfo | None, revision: int
    ) -> None:
        """Put (``info``) or delete (None) one entry of ``view`` at ``revision``."""
        self._revisions[worker_id] = revision
        if info is None:
            view.pop(worker_id, None)
            self._tombstones.add(worker_id)
        else:
            view[worker_id] = info
            self._tombstones.discard(worker_id)

    def _apply_own_write(self, worker_id: str, info: WorkerInfo | None, revision: int) -> None:
        """Read-your-writes: show an acknowledged own put (or delete: None) at once.

        The watch delivers the same change later at the same revision (a no-op then); a change
        that etcd made after it arrives with a higher revision and wins.
        """
        if revision <= 0 or self._is_stale(worker_id, revision):
            return
        view = dict(self._view)
        self._set_entry(view, worker_id, info, revision)
        self._publish(view)

    def _install_listing(
        self, entries: dict[str, tuple[WorkerInfo | None, int]], revision: int
    ) -> None:
        """Replace the view by a listing of the prefix at ``revision`` (authoritative).

        Own writes applied at a revision above the listing's (acknowledged after etcd served
        the listing) are kept: the watch, which starts right after the listing, delivers them.
        A listing below the view revision means etcd lost its data (a new cluster on the same
        address): then nothing of the old view is kept.
        """
        reset = revision < self._view_revision
        view: dict[str, WorkerInfo] = {}
        revisions: dict[str, int] = {}
        tombstones: set[str] = set()
        for worker_id, (info, mod_revision) in entries.items():
            revisions[worker_id] = mod_revision
            if info is not None:
                view[worker_id] = info
        if not reset:
            for worker_id, own_revision in self._revisions.items():
                if own_revision > revision:
                    revisions[worker_id] = own_revision
                    if worker_id in self._tombstones:
                        view.pop(worker_id, None)
                        tombstones.add(worker_id)
                    elif worker_id in self._view:
                        view[worker_id] = self._view[worker_id]
        self._revisions = revisions
        self._tombstones = tombstones
        self._publish(view)
        self._view_revision = revision
        self._advance(revision)

    async def _wait_view(self, revision: int) -> None:
        """Read-your-writes: wait until the watch delivered ``revision`` (bounded)."""
        if revision <= self._view_revision or self._closed:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (revision, fut)
        self._revision_waiters.append(entry)
        try:
            async with asyncio.timeout(self.request_timeout):
                await fut
        except TimeoutError:
            log.debug("view did not reach revision %d in time", revision)
        finally:
            with contextlib.suppress(ValueError):
                self._revision_waiters.remove(entry)

    async def _watch_loop(self) -> None:
        failures = 0
        while not self._closing:
            try:
                async with self._rpc("list workers") as client:
                    resp = await client.get_prefix(self.workers_prefix.encode())
                revision = int(resp.header.revision)
                entries: dict[str, tuple[WorkerInfo | None, int]] = {}
                for kv in resp:
                    worker_id, info = self._parse_entry(kv.key, kv.value)
                    entries[worker_id] = (info, int(kv.mod_revision))
                self._install_listing(entries, revision)
                self._first_sync.set()
                async with self._rpc("watch workers") as client:
                    watch = await client.watch_prefix(
                        self.workers_prefix.encode(), start_revision=revision + 1
                    )
                    try:
                        self._set_healthy(True)
                        failures = 0
                        async for event in watch:
                            self._apply(event)
                    finally:
                        # Stop the server-side watch too, or its events keep queueing for nobody.
                        with contextlib.suppress(Exception):
                            async with asyncio.timeout(self.request_timeout):
                                await watch.cancel()
                # The stream ended without an error: the client was closed under it.
                failures += 1
            except aetcd.RevisionCompactedError as exc:
                log.info("etcd compacted past the watch (%s): listing again", exc)
                failures = 0
                continue
            except Unavailable as exc:
                failures += 1
                self._set_healthy(False)
                log.debug("etcd watch: %s", exc)
            except Exception:
                failures += 1
                log.exception("etcd watch loop error")
            self._first_sync.set()
            await asyncio.sleep(_backoff(failures, min(1.0, self.heartbeat_interval)))

    def _apply(self, event: Any) -> None:
        """One watch event; dropped when the view already has the entry at a later revision."""
        key = bytes(event.kv.key)
        revision = int(event.kv.mod_revision)  # for a delete: the revision of the delete
        info: WorkerInfo | None = None
        if event.kind == "PUT":
            worker_id, info = self._parse_entry(key, event.kv.value)
        else:
            worker_id = key.decode("utf-8", "replace")[len(self.workers_prefix) :]
        if self._is_stale(worker_id, revision):
            log.debug(
                "ignoring a stale watch event for worker %s (revision %d; view at %d, entry at %d)",
                worker_id,
                revision,
                self._view_revision,
                self._revisions.get(worker_id, 0),
            )
        else:
            view = dict(self._view)
            self._set_entry(view, worker_id, info, revision)
            self._publish(view)
        self._advance(revision)  # stale or not, the stream has delivered everything up to here

    # --- session (lease + keepalive) -----------------------------------------------------

    def _lease_expired(self) -> None:
        log.warning(
            "etcd lease %s of cluster %s expired%s",
            self._lease_id,
            self.cluster,
            ": registering again with a new lease" if self._wanted else "",
        )
        self._lease_id = None
        self._written.clear()
        self._dirty = bool(self._wanted)
        self.sessions_lost += 1

    async def _ensure_lease_locked(self) -> int:
        if self._lease_id is None:
            async with self._rpc("lease grant") as client:
                lease = await client.lease(self.lease_ttl)
            self._lease_id = int(lease.id)
        return self._lease_id

    async def _write_locked(self, worker_ids: Iterable[str]) -> int:
        """Write registrations under the lease (all of them when dirty); the last revision."""
        for _attempt in range(2):
            lease_id = await self._ensure_lease_locked()
            ids = (
                list(self._wanted) if self._dirty else [w for w in worker_ids if w in self._wanted]
            )
            revision = 0
            try:
                for worker_id in ids:
                    info = self._wanted[worker_id]
                    value = info.to_json()
                    async with self._rpc("register") as client:
                        resp = await client.put(self._worker_key(worker_id), value, lease=lease_id)
                    self._written[worker_id] = value
                    put_revision = int(resp.header.revision)
                    self._apply_own_write(worker_id, info, put_revision)
                    revision = max(revision, put_revision)
            except _LeaseGone:
                self._lease_expired()
                continue
            self._dirty = False
            return revision
        raise Unavailable("etcd lost the new lease at once")

    async def _flush_deletes_locked(self) -> None:
        """Delete own entries deregistered while etcd was down, unless someone rewrote them."""
        for worker_id, value in list(self._pending_deletes.items()):
            key = self._worker_key(worker_id)
            async with self._rpc("deregister") as client:
                await client.transaction(
                    compare=[client.transactions.value(key) == value],
                    success=[client.transactions.delete(key)],
                    failure=[],
                )
            del self._pending_deletes[worker_id]

    async def _heartbeat_locked(self) -> None:
        if self._lease_id is not None:
            async with self._rpc("lease keepalive") as client:
                reply = await client.refresh_lease(self._lease_id)
            if reply is None:
                raise Unavailable("etcd keepalive got no answer")
            if int(reply.TTL) <= 0:
                self._lease_expired()
        if self._wanted and (self._lease_id is None or self._dirty):
            await self._write_locked(())
        if self._pending_deletes:
            await self._flush_deletes_locked()

    async def _session_loop(self) -> None:
        failures = 0
        while not self._closing:
            delay = self.heartbeat_interval
            try:
                async with self._session_lock:
                    await self._heartbeat_locked()
                failures = 0
            except Unavailable as exc:
                failures += 1
                delay = _backoff(failures, self.heartbeat_interval)
                log.debug("etcd heartbeat: %s", exc)
            except Exception:
                failures += 1
                delay = _backoff(failures, self.heartbeat_interval)
                log.exception("etcd session loop error")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()

    # --- membership writes ---------------------------------------------------------------

    async def register(self, info: WorkerInfo) -> None:
        """Write the entry under this instance's lease; it is in ``workers()`` on return.

        Deferred path: when etcd does not answer in ``request_timeout`` (down, partitioned, or
        too slow under load) the call logs a warning and returns without the entry in the view:
        the registration is kept, the session loop writes it as soon as etcd answers, and the
        view shows it from that write on. A put that timed out may still have reached etcd; the
        rewrite then only renews it.
        """
        self._check_open()
        self._pending_deletes.pop(info.worker_id, None)
        self._wanted[info.worker_id] = info
        await self._write_or_defer(info.worker_id, "register")

    async def update(self, info: WorkerInfo) -> None:
        self._check_open()
        if info.worker_id not in self._wanted:
            raise NotFound("worker is not registered by this instance", info.worker_id)
        self._wanted[info.worker_id] = info
        await self._write_or_defer(info.worker_id, "update")

    async def _write_or_defer(self, worker_id: str, what: str) -> None:
        """Write now and read it back from the view, or defer to the session loop (see
        ``register``). The write is in the view once etcd acknowledged it; waiting for the watch
        to reach its revision then brings the rest of the view up to that revision too (bounded
        by ``request_timeout``: a lagging watch delays nothing else)."""
        try:
            async with self._session_lock:
                revision = await self._write_locked([worker_id])
        except Unavailable as exc:
            self._dirty = True
            self._wake.set()
            log.warning("%s of worker %s deferred until etcd answers: %s", what, worker_id, exc)
            return
        await self._wait_view(revision)

    async def deregister(self, worker_id: str) -> None:
        """Delete the entry; for an own worker whose delete cannot reach etcd now, the session
        loop deletes it later (if nobody rewrote it). Another instance's worker: ``Unavailable``.
        """
        self._check_open()
        async with self._session_lock:
            was_ours = self._wanted.pop(worker_id, None) is not None
            written = self._written.pop(worker_id, None)
            try:
                async with self._rpc("deregister") as client:
                    resp = await client.delete(self._worker_key(worker_id))
            except Unavailable:
                if not was_ours:
                    raise
                if written is not None:
                    self._pending_deletes[worker_id] = written
                    self._wake.set()
                return
            if resp is not None:
                self._apply_own_write(worker_id, None, int(resp.header.revision))
        if resp is not None:
            await self._wait_view(int(resp.header.revision))

    # --- ClusterStore --------------------------------------------------------------------

    def _kv_key(self, key: str) -> bytes:
        return (self.prefix + key).encode()

    async def kv_get(self, key: str) -> bytes | None:
        self._check_open()
        check_kv_key(key)
        async with self._rpc("get") as client:
            resp = await client.get(self._kv_key(key))
        return None if resp is None else bytes(resp.value)

    async def _with_lease(self, ephemeral: bool, op: str, key: str, value: bytes) -> bool:
        """Run a put (``op="put"``) or create under the session lease if ``ephemeral``."""
        k = self._kv_key(key)
        for _attempt in range(2):
            lease: int | None = None
            try:
                if ephemeral:
                    async with self._session_lock:
                        lease = await self._ensure_lease_locked()
                async with self._rpc(op) as client:
                    if op == "put":
                        await client.put(k, value, lease=lease)
                        return True
                    created, _ = await client.transaction(
                        compare=[client.transactions.version(k) == 0],
                        success=[client.transactions.put(k, value, lease=lease)],
                        failure=[],
                    )
                    return bool(created)
            except _LeaseGone:
                async with self._session_lock:
                    if self._lease_id == lease:
                        self._lease_expired()
        raise Unavailable(f"etcd lost the new lease at once ({op} {key})")

    async def kv_put(self, key: str, value: bytes, *, ephemeral: bool = False) -> None:
        self._check_open()
        check_kv_key(key)
        await self._with_lease(ephemeral, "put", key, check_kv_value(value))

    async def kv_create(self, key: str, value: bytes, *, ephemeral: bool = False) -> bool:
        self._check_open()
        check_kv_key(key)
        return await self._with_lease(ephemeral, "create", key, check_kv_value(value))

    async def kv_delete(self, key: str) -> bool:
        self._check_open()
        check_kv_key(key)
        async with self._rpc("delete") as client:
            resp = await client.delete(self._kv_key(key))
        return resp is not None

    async def kv_list(self, prefix: str = "") -> dict[str, bytes]:
        self._check_open()
        if prefix:
            check_kv_key(prefix)
        async with self._rpc("list") as client:
            resp = await client.get_prefix(self._kv_key(prefix) if prefix else self.prefix.encode())
        out: dict[str, bytes] = {}
        for kv in resp:
            key = bytes(kv.key).decode("utf-8", "replace")[len(self.prefix) :]
            if not key.startswith(WORKERS_PREFIX):
                out[key] = bytes(kv.value)
        return dict(sorted(out.items()))
