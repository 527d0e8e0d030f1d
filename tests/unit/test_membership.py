"""Membership: the embedded and static implementations run the contract; the model and config."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest

from depot.core.errors import ConfigError, InvalidArgument, NotFound, Unavailable
from depot.placement.etcd import EtcdMembership, parse_etcd_endpoint
from depot.placement.membership import (
    EmbeddedMembership,
    EmbeddedRegistry,
    Membership,
    StaticMembership,
    WorkerInfo,
    static_worker_id,
)
from depot.testing.membership_contract import (
    ENDPOINTS,
    ClusterStoreContract,
    DynamicMembershipContract,
    MembershipContract,
    MembershipFactory,
    worker_info,
)

# --- the contract --------------------------------------------------------------------------


class TestEmbeddedContract(DynamicMembershipContract, ClusterStoreContract):
    @pytest.fixture
    async def membership_factory(self) -> AsyncIterator[MembershipFactory]:
        registry = EmbeddedRegistry()
        made: list[Membership] = []

        async def make() -> Membership:
            m = EmbeddedMembership(registry)
            await m.start()
            made.append(m)
            return m

        yield make
        for m in made:
            await m.close()


class TestStaticContract(MembershipContract):
    @pytest.fixture
    async def membership_factory(self) -> AsyncIterator[MembershipFactory]:
        made: list[Membership] = []

        async def make() -> Membership:
            m = StaticMembership(ENDPOINTS)
            await m.start()
            made.append(m)
            return m

        yield make
        for m in made:
            await m.close()


# --- WorkerInfo ----------------------------------------------------------------------------


def test_worker_info_json_round_trip() -> None:
    info = worker_info(1)
    data = info.to_json()
    assert WorkerInfo.from_json(data) == info
    assert WorkerInfo.from_json(data.decode()) == info
    assert json.loads(data)["worker_id"] == info.worker_id
    assert worker_info(1).to_json() == data  # equal infos, equal bytes


def test_worker_info_from_json_ignores_unknown_and_fills_defaults() -> None:
    raw = {"worker_id": "ab12", "endpoint": "http://h:1", "future_field": [1, 2], "started_at": 5}
    info = WorkerInfo.from_json(json.dumps(raw))
    assert info.worker_id == "ab12"
    assert info.state == "live" and info.is_live
    assert info.capacity_bytes == 0 and info.used_bytes == 0
    assert info.started_at == 5.0 and isinstance(info.started_at, float)


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        b'{"endpoint": "http://h:1"}',
        b'{"worker_id": "ab"}',
        b'{"worker_id": "a/b", "endpoint": "http://h:1"}',
        b'{"worker_id": "ab", "endpoint": "h:1"}',
        b'{"worker_id": "ab", "endpoint": "http://h:1", "used_bytes": -1}',
        b'{"worker_id": "ab", "endpoint": "http://h:1", "capacity_bytes": "1"}',
        b'{"worker_id": "ab", "endpoint": "http://h:1", "state": ""}',
    ],
)
def test_worker_info_rejects_bad_entries(raw: bytes) -> None:
    with pytest.raises(InvalidArgument):
        WorkerInfo.from_json(raw)


def test_worker_id_accepts_ring_identity_text() -> None:
    WorkerInfo(worker_id="0123456789abcdef0123456789abcdef", endpoint="https://w:7070")
    WorkerInfo(worker_id="v2:0123456789abcdef0123456789abcdef", endpoint="http://[::1]:7070")
    with pytest.raises(InvalidArgument):
        WorkerInfo(worker_id="x" * 129, endpoint="http://w:1")


# --- static --------------------------------------------------------------------------------


def test_static_ids_are_deterministic_and_ring_identities() -> None:
    wid = static_worker_id("http://Worker-1:7070/")
    assert wid == static_worker_id("http://worker-1:7070")
    assert len(wid) == 32 and int(wid, 16) >= 0
    assert wid != static_worker_id("http://worker-1:7071")


async def test_static_lists_the_config() -> None:
    m = StaticMembership(["http://b:7070", "http://a:7070/"])
    await m.start()
    view = await m.workers()
    assert {w.endpoint for w in view} == {"http://a:7070", "http://b:7070"}
    assert all(w.worker_id == static_worker_id(w.endpoint) for w in view)
    assert m.healthy
    assert m.endpoints == ["http://b:7070", "http://a:7070"]


async def test_static_register_replaces_locally_and_deregister_restores() -> None:
    m = StaticMembership(["http://a:7070", "http://b:7070"])
    await m.start()
    real = WorkerInfo(worker_id="feed" * 8, endpoint="http://a:7070", capacity_bytes=10)
    await m.register(real)
    view = await m.workers()
    assert real in view and len(view) == 2
    await m.deregister(real.worker_id)
    assert {w.worker_id for w in await m.workers()} == {
        static_worker_id("http://a:7070"),
        static_worker_id("http://b:7070"),
    }


async def test_static_refuses_unknown_endpoints_and_id_clashes() -> None:
    m = StaticMembership(["http://a:7070", "http://b:7070"])
    await m.start()
    with pytest.raises(InvalidArgument):
        await m.register(WorkerInfo(worker_id="ab", endpoint="http://c:7070"))
    await m.register(WorkerInfo(worker_id="ab", endpoint="http://a:7070"))
    with pytest.raises(InvalidArgument):
        await m.register(WorkerInfo(worker_id="ab", endpoint="http://b:7070"))
    with pytest.raises(NotFound):
        await m.update(WorkerInfo(worker_id="cd", endpoint="http://a:7070"))


@pytest.mark.parametrize("endpoints", [["http://a:1", "http://a:1/"], ["not a url"], "http://a:1"])
def test_static_bad_config(endpoints: list[str]) -> None:
    with pytest.raises(ConfigError):
        StaticMembership(endpoints)


# --- embedded ------------------------------------------------------------------------------


async def test_embedded_needs_start_and_refuses_after_close() -> None:
    m = EmbeddedMembership()
    with pytest.raises(Unavailable):
        await m.register(worker_info(0))
    await m.start()
    await m.register(worker_info(0))
    await m.close()
    with pytest.raises(Unavailable):
        await m.kv_get("jobs/x")


async def test_embedded_instances_without_a_shared_registry_are_separate() -> None:
    async with EmbeddedMembership() as a, EmbeddedMembership() as b:
        await a.register(worker_info(0))
        await a.kv_put("jobs/1", b"x")
        assert await b.workers() == []
        assert await b.kv_get("jobs/1") is None


async def test_embedded_update_of_another_instances_worker_is_not_found() -> None:
    registry = EmbeddedRegistry()
    async with EmbeddedMembership(registry) as a, EmbeddedMembership(registry) as b:
        await a.register(worker_info(0))
        with pytest.raises(NotFound):
            await b.update(worker_info(0, used_bytes=1))


# --- etcd without a server -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://10.0.0.1:2379", ("10.0.0.1", 2379)),
        ("etcd.local:12379", ("etcd.local", 12379)),
        ("etcd.local", ("etcd.local", 2379)),
        ("http://[::1]:2379/", ("::1", 2379)),
    ],
)
def test_parse_etcd_endpoint(url: str, expected: tuple[str, int]) -> None:
    assert parse_etcd_endpoint(url) == expected


@pytest.mark.parametrize("url", ["https://e:2379", "ftp://e", "http://e:2379/v3", "http://e:x"])
def test_parse_etcd_endpoint_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_etcd_endpoint(url)


def test_etcd_settings() -> None:
    m = EtcdMembership("http://e1:2379,http://e2:2379", cluster="prod", lease_ttl=15)
    assert m.lease_ttl == 15 and m.heartbeat_interval == 5.0
    assert m.request_timeout == 5.0
    assert m.workers_prefix == "/depot/prod/workers/"
    assert m.endpoint == "http://e1:2379"
    assert EtcdMembership(["http://e:1"], lease_ttl=0.5).lease_ttl == 2
    assert EtcdMembership(["http://e:1"], lease_ttl=2.2).lease_ttl == 3
    with pytest.raises(ConfigError):
        EtcdMembership([], cluster="c")
    with pytest.raises(ConfigError):
        EtcdMembership(["http://e:1"], cluster="bad/name")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_etcd_unreachable_from_the_start() -> None:
    """Workers may start before etcd: start() returns, the view is empty, writes wait."""
    m = EtcdMembership([f"http://127.0.0.1:{_closed_port()}"], lease_ttl=2)
    await m.start()
    try:
        assert not m.healthy
        assert await m.workers() == []
        await m.register(worker_info(0))  # kept, written once etcd answers
        await m.update(worker_info(0, used_bytes=1))
        with pytest.raises(Unavailable):
            await m.kv_get("jobs/1")
        with pytest.raises(Unavailable):
            await m.deregister("ab" * 16)  # not ours: etcd must answer
        await m.deregister(worker_info(0).worker_id)  # ours, never written: nothing to do
        assert await m.workers() == []
    finally:
        await m.close()
    with pytest.raises(Unavailable):
        await m.register(worker_info(0))


# --- etcd view ordering (no server: events fed by hand) --------------------------------------


def _etcd_view() -> EtcdMembership:
    return EtcdMembership(["http://127.0.0.1:1"], cluster="order", lease_ttl=2)


def _event(m: EtcdMembership, kind: str, info: WorkerInfo, revision: int) -> SimpleNamespace:
    key = m.workers_prefix.encode() + info.worker_id.encode()
    kv = SimpleNamespace(key=key, value=info.to_json(), mod_revision=revision)
    return SimpleNamespace(kind=kind, kv=kv)


def _listing(*entries: tuple[WorkerInfo, int]) -> dict[str, tuple[WorkerInfo | None, int]]:
    return {info.worker_id: (info, revision) for info, revision in entries}


async def test_etcd_late_event_does_not_undo_an_own_write() -> None:
    """The restarted-worker race: another instance's older put arrives after our own put."""
    m = _etcd_view()
    old, moved = worker_info(0), worker_info(0, endpoint=ENDPOINTS[5], started_at=1.8e9)
    m._install_listing({}, 10)
    m._apply_own_write(moved.worker_id, moved, 12)
    assert await m.workers() == [moved]
    m._apply(_event(m, "PUT", old, 11))  # committed before ours, delivered after
    assert await m.workers() == [moved]
    generation = m.generation
    m._apply(_event(m, "PUT", moved, 12))  # the watch catches up with our write: no change
    assert await m.workers() == [moved] and m.generation == generation
    m._apply(_event(m, "PUT", old, 13))  # a later write wins
    assert await m.workers() == [old]


async def test_etcd_replayed_events_older_than_the_listing_are_ignored() -> None:
    """A watch stream that starts before the listing (aetcd can hand a timed-out watch to the
    next caller) must not bring back entries that were replaced or deleted before it."""
    m = _etcd_view()
    moved = worker_info(0, used_bytes=5)
    m._install_listing(_listing((moved, 15)), 20)
    for kind, info, revision in [
        ("PUT", worker_info(0), 11),
        ("PUT", worker_info(1), 12),  # deleted before the listing
        ("DELETE", worker_info(0), 13),
        ("PUT", moved, 15),
    ]:
        m._apply(_event(m, kind, info, revision))
    assert await m.workers() == [moved]
    m._apply(_event(m, "PUT", worker_info(2), 21))
    assert await m.workers() == [moved, worker_info(2)]


async def test_etcd_own_delete_is_not_undone_by_an_older_put() -> None:
    m = _etcd_view()
    m._install_listing(_listing((worker_info(0), 5)), 10)
    m._apply_own_write(worker_info(0).worker_id, None, 12)
    assert await m.workers() == []
    m._apply(_event(m, "PUT", worker_info(0, used_bytes=1), 11))
    assert await m.workers() == []
    m._apply(_event(m, "DELETE", worker_info(0), 12))
    m._apply(_event(m, "PUT", worker_info(0, used_bytes=2), 13))
    assert await m.workers() == [worker_info(0, used_bytes=2)]


async def test_etcd_listing_keeps_own_writes_it_predates() -> None:
    m = _etcd_view()
    m._install_listing(_listing((worker_info(0), 5)), 10)
    m._apply_own_write(worker_info(1).worker_id, worker_info(1), 12)
    m._apply_own_write(worker_info(0).worker_id, None, 13)
    m._install_listing(_listing((worker_info(0), 5)), 11)  # served before our writes
    assert await m.workers() == [worker_info(1)]
    m._install_listing(_listing((worker_info(1), 12)), 14)  # after them: authoritative
    assert await m.workers() == [worker_info(1)]
    m._install_listing({}, 3)  # etcd lost its data: the listing wins outright
    assert await m.workers() == []
