"""etcd membership against a real etcd: the contract, then leases, outages and partitions.

Every test uses its own cluster name (keys under ``/depot/<name>/``) on one etcd per session.
Outage tests stop and restart that etcd (same ports and data dir); partition tests put a small
TCP proxy between one instance and etcd and cut it, so a lease really expires while etcd stays up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from depot.core.errors import Unavailable
from depot.placement.etcd import EtcdMembership
from depot.placement.membership import Membership, WorkerInfo
from depot.testing.membership_contract import (
    ENDPOINTS,
    ClusterStoreContract,
    DynamicMembershipContract,
    MembershipFactory,
    Recorder,
    eventually,
    worker_info,
)

from .conftest import EtcdServer, free_port

TTL = 2  # etcd's floor; heartbeats every 0.67 s

EtcdFactory = Callable[..., Awaitable[EtcdMembership]]


@pytest.fixture
async def make_etcd(etcd_server: EtcdServer, etcd_cluster: str) -> AsyncIterator[EtcdFactory]:
    """``await make_etcd(lease_ttl=..., endpoints=...)``: a started instance on this test's cluster."""
    made: list[EtcdMembership] = []

    async def make(
        lease_ttl: float = TTL,
        endpoints: list[str] | None = None,
        request_timeout: float | None = None,
    ) -> EtcdMembership:
        m = EtcdMembership(
            endpoints or etcd_server.endpoints,
            cluster=etcd_cluster,
            lease_ttl=lease_ttl,
            request_timeout=request_timeout,
        )
        await m.start()
        made.append(m)
        return m

    yield make
    for m in made:
        await m.close()


class TestEtcdContract(DynamicMembershipContract, ClusterStoreContract):
    @pytest.fixture
    async def membership_factory(self, make_etcd: EtcdFactory) -> MembershipFactory:
        async def make() -> Membership:
            # A generous call limit: on a loaded 2-core CI machine one etcd call can take over a
            # second, and a call that times out is retried later, which the contract would see
            # as a write not yet visible.
            return await make_etcd(lease_ttl=5, request_timeout=5.0)

        return make


def _stale_loop_callback(record: logging.LogRecord) -> bool:
    """grpc.aio shares one completion queue across event loops; a completion that arrives for a
    call of an earlier test's loop (pytest-asyncio closes one loop per test) is handed to that
    closed loop and asyncio logs it. A process with one loop, as a worker has, never sees this."""
    exc = record.exc_info[1] if record.exc_info else None
    return (
        record.name == "asyncio"
        and "PollerCompletionQueue._handle_events" in record.getMessage()
        and isinstance(exc, RuntimeError)
        and "Event loop is closed" in str(exc)
    )


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The loops may log warnings about etcd; an error means a loop or a task blew up."""
    errors = [
        r for r in caplog.records if r.levelno >= logging.ERROR and not _stale_loop_callback(r)
    ]
    assert not errors, [r.getMessage() for r in errors]


async def test_lease_expiry_removes_a_silent_worker(make_etcd: EtcdFactory) -> None:
    observer = await make_etcd()
    worker = await make_etcd()
    recorder = Recorder()
    observer.subscribe(recorder)
    info = worker_info(0)
    await worker.register(info)
    await recorder.wait_for(lambda v: info in v, 2.0)
    mark = recorder.mark()
    await worker.close(leave=False)  # as a crash: no revoke, heartbeats stop
    stopped = time.monotonic()
    await recorder.wait_for(lambda v: info not in v, TTL + 1.0, since=mark)
    assert time.monotonic() - stopped <= TTL + 1.0
    assert await observer.workers() == []


async def test_graceful_close_leaves_at_once(make_etcd: EtcdFactory) -> None:
    observer = await make_etcd()
    worker = await make_etcd(lease_ttl=30)
    recorder = Recorder()
    observer.subscribe(recorder)
    await worker.register(worker_info(1))
    await recorder.wait_for(lambda v: worker_info(1) in v, 2.0)
    mark = recorder.mark()
    await worker.close()
    await recorder.wait_for(lambda v: v == [], 1.0, since=mark)  # far less than the 30 s TTL


async def test_etcd_down_then_back(
    make_etcd: EtcdFactory, etcd_server: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    worker = await make_etcd()
    observer = await make_etcd()
    recorder = Recorder()
    observer.subscribe(recorder)
    info = worker_info(0)
    await worker.register(info)
    await recorder.wait_for(lambda v: v == [info], 2.0)
    generation = observer.generation

    mark = recorder.mark()
    etcd_server.stop()
    try:

        async def both_unhealthy() -> bool:
            return not worker.healthy and not observer.healthy

        await eventually(both_unhealthy, 3.0, "both instances notice etcd is down")
        # The last view is still served, and nothing raises for the view or for own writes.
        assert await observer.workers() == [info]
        assert await worker.workers() == [info]
        assert observer.generation == generation
        updated = info.with_usage(42)
        await worker.update(updated)  # deferred until etcd answers
        with pytest.raises(Unavailable):
            await observer.kv_get("jobs/x")
        await asyncio.sleep(1.0)  # several failed heartbeats and watch retries
        assert await observer.workers() == [info]
    finally:
        etcd_server.start()

    async def both_healthy() -> bool:
        return worker.healthy and observer.healthy

    await eventually(both_healthy, 5.0, "both instances reconnect")
    # The update made while etcd was down is written and watchers get the fresh view.
    await recorder.wait_for(lambda v: v == [updated], 5.0, since=mark)

    async def own_view_updated() -> bool:
        return await worker.workers() == [updated]

    # The worker's own view may lag the observer's by a heartbeat: under load, the deferred put
    # can reach etcd after its request timed out, and is shown from the rewrite that follows.
    await eventually(own_view_updated, 5.0, "the worker's own view shows its update")
    assert await observer.kv_get("jobs/x") is None
    no_errors_logged(caplog)


class TcpProxy:
    """A loopback TCP relay that can cut every connection and refuse new ones (a partition)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        await self.cut()


@pytest.fixture
async def proxy(etcd_server: EtcdServer) -> AsyncIterator[TcpProxy]:
    p = TcpProxy(etcd_server.process.port)
    await p.start()
    yield p
    await p.close()


async def test_partition_longer_than_the_lease(
    make_etcd: EtcdFactory, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """The lease expires for real while the worker cannot reach etcd; once it can, the worker
    registers again under a new lease (ephemeral KV entries stay gone)."""
    caplog.set_level(logging.WARNING)
    worker = await make_etcd(endpoints=[proxy.endpoint])
    observer = await make_etcd()
    recorder = Recorder()
    observer.subscribe(recorder)
    info = worker_info(2)
    await worker.register(info)
    await worker.kv_put("jobs/lock", b"worker", ephemeral=True)
    await recorder.wait_for(lambda v: v == [info], 2.0)
    old_lease = worker.lease_id

    mark = recorder.mark()
    await proxy.cut()
    await recorder.wait_for(lambda v: v == [], TTL + 1.5, since=mark)  # the lease expired
    assert not worker.healthy
    assert await worker.workers() == [info]  # the partitioned side keeps its last view
    assert await observer.kv_get("jobs/lock") is None

    mark = recorder.mark()
    await proxy.start()
    await recorder.wait_for(lambda v: v == [info], 5.0, since=mark)
    assert worker.lease_id is not None and worker.lease_id != old_lease
    assert worker.sessions_lost == 1
    await eventually(_healthy(worker), 3.0, "worker healthy again")
    assert await observer.kv_get("jobs/lock") is None  # not rewritten: its session was lost
    no_errors_logged(caplog)


def _healthy(m: Membership) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return m.healthy

    return check


async def test_restarted_worker_with_the_same_id_replaces_its_entry(
    make_etcd: EtcdFactory,
) -> None:
    observer = await make_etcd()
    recorder = Recorder()
    observer.subscribe(recorder)
    old = await make_etcd()
    await old.register(worker_info(0))
    await recorder.wait_for(lambda v: v == [worker_info(0)], 2.0)
    await old.close(leave=False)  # crashed: its lease lives on until the TTL

    new = await make_etcd()
    restarted = worker_info(0, endpoint=ENDPOINTS[3], started_at=time.time())
    await new.register(restarted)
    await recorder.wait_for(lambda v: v == [restarted], 2.0)
    # When the dead process's lease expires, the entry (now on the new lease) must stay.
    await asyncio.sleep(TTL + 1.0)
    assert await observer.workers() == [restarted]
    assert recorder.last == [restarted]


async def test_failover_to_the_next_endpoint(
    make_etcd: EtcdFactory, etcd_server: EtcdServer
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    m = await make_etcd(endpoints=[dead, etcd_server.endpoint])
    await eventually(_healthy(m), 3.0, "the second endpoint is used")
    assert m.endpoint == etcd_server.endpoint
    await m.register(worker_info(1))
    assert await m.workers() == [worker_info(1)]


async def test_same_view_from_every_instance(make_etcd: EtcdFactory) -> None:
    """Many workers and observers converge on one sorted view (what the ring is built from)."""
    workers = [await make_etcd(lease_ttl=5) for _ in range(4)]
    observer = await make_etcd(lease_ttl=5)
    infos: list[WorkerInfo] = [worker_info(n) for n in range(4)]
    await asyncio.gather(*(w.register(i) for w, i in zip(workers, infos, strict=True)))

    async def converged() -> bool:
        views = [await m.workers() for m in [*workers, observer]]
        return all(v == infos for v in views)

    await eventually(converged, 3.0, "every instance sees all workers")
    with contextlib.suppress(Exception):
        await workers[0].close()
    await eventually(
        lambda: _view_is(observer, infos[1:]), 3.0, "the closed worker left everyone's view"
    )


async def _view_is(m: Membership, expected: list[WorkerInfo]) -> bool:
    return await m.workers() == expected
