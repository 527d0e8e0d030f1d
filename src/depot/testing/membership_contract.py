"""The behaviour every ``Membership`` (and ``ClusterStore``) must show, as pytest suites to subclass.

    class TestMyMembership(DynamicMembershipContract, ClusterStoreContract):
        @pytest.fixture
        async def membership_factory(self):
            made = []
            async def make():
                m = MyMembership(shared_backend)      # every call: same backend, new instance
                await m.start()
                made.append(m)
                return m
            yield make
            for m in made:
                await m.close()

Three suites:

- ``MembershipContract``: what any membership does, a fixed static list included: a registered
  worker is in the view on return, updates show, the view is sorted and copied, the generation
  grows on every change and only then, subscribers get the view at once and after every change.
  Registered workers use the endpoints ``ENDPOINTS`` (so a static list can be built from them).
- ``DynamicMembershipContract``: workers join and leave, and instances sharing a backend see each
  other's workers (the factory's instances share one backend); closing an instance makes its
  workers leave.
- ``ClusterStoreContract``: the KV API (get/put/create/delete/list, ephemeral entries, key checks).

Propagation between instances is asynchronous for real backends: tests poll up to
``propagation_timeout`` seconds. Within one instance, writes are visible on return.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, ClassVar

import pytest

from depot.core.errors import InvalidArgument, NotFound, RequestTooLarge
from depot.placement.membership import (
    DRAINING,
    MAX_VALUE_BYTES,
    ClusterStore,
    Membership,
    WorkerInfo,
)

MembershipFactory = Callable[[], Awaitable[Membership]]

ENDPOINTS = [f"http://127.0.0.1:{7100 + i}" for i in range(6)]
"""The worker URLs the contract registers; a static list under test must contain them all."""


def worker_info(n: int, **changes: Any) -> WorkerInfo:
    """Worker ``n`` of the contract: a 32-hex-digit id and endpoint ``ENDPOINTS[n]``."""
    info = WorkerInfo(
        worker_id=f"{0xD0D0 + n:032x}",
        endpoint=ENDPOINTS[n],
        capacity_bytes=1 << 30,
        used_bytes=n * 1000,
        started_at=1_700_000_000.0 + n,
        version="test",
    )
    return replace(info, **changes) if changes else info


def by_id(view: list[WorkerInfo]) -> dict[str, WorkerInfo]:
    return {w.worker_id: w for w in view}


class Recorder:
    """A subscriber that keeps every view it was given and can wait for one."""

    def __init__(self) -> None:
        self.views: list[list[WorkerInfo]] = []
        self._changed = asyncio.Event()

    def __call__(self, view: list[WorkerInfo]) -> None:
        self.views.append(view)
        self._changed.set()

    @property
    def last(self) -> list[WorkerInfo]:
        assert self.views, "the subscriber was never called"
        return self.views[-1]

    def mark(self) -> int:
        """A position for ``wait_for(..., since=)``: only views given after it will count."""
        return len(self.views)

    async def wait_for(
        self,
        predicate: Callable[[list[WorkerInfo]], bool],
        within: float,
        *,
        since: int = 0,
    ) -> list[WorkerInfo]:
        """The first view given at or after position ``since`` that satisfies ``predicate``
        (already seen or still to come)."""
        deadline = time.monotonic() + within
        seen = since
        while True:
            for view in self.views[seen:]:
                if predicate(view):
                    return view
            seen = len(self.views)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no view matched within {within}s; last: {self.views[-1:]}")
            self._changed.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                pass


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float, what: str = "condition"
) -> None:
    """Poll ``check`` until it is true; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within}s")
        await asyncio.sleep(0.02)


class MembershipContract:
    """Inherit and provide ``membership_factory`` (see the module docstring)."""

    #: Seconds a change may take to reach another instance.
    propagation_timeout: ClassVar[float] = 5.0

    @pytest.fixture
    async def membership(self, membership_factory: MembershipFactory) -> Membership:
        return await membership_factory()

    async def test_started_membership_is_healthy(self, membership: Membership) -> None:
        assert membership.healthy
        assert isinstance(await membership.workers(), list)
        assert membership.generation >= 0

    async def test_register_is_visible_on_return(self, membership: Membership) -> None:
        info = worker_info(0)
        await membership.register(info)
        assert by_id(await membership.workers())[info.worker_id] == info

    async def test_register_again_replaces(self, membership: Membership) -> None:
        await membership.register(worker_info(1))
        await membership.register(worker_info(1, used_bytes=5, state=DRAINING))
        view = await membership.workers()
        assert [w.worker_id for w in view].count(worker_info(1).worker_id) == 1
        assert by_id(view)[worker_info(1).worker_id] == worker_info(1, used_bytes=5, state=DRAINING)

    async def test_update_is_visible(self, membership: Membership) -> None:
        info = worker_info(2)
        await membership.register(info)
        before = membership.generation
        updated = info.with_usage(123_456, capacity_bytes=2 << 30)
        await membership.update(updated)
        got = by_id(await membership.workers())[info.worker_id]
        assert got.used_bytes == 123_456
        assert got.capacity_bytes == 2 << 30
        assert membership.generation > before

    async def test_update_of_unregistered_worker_is_not_found(self, membership: Membership) -> None:
        with pytest.raises(NotFound):
            await membership.update(worker_info(3))
        assert worker_info(3).worker_id not in by_id(await membership.workers())

    async def test_generation_grows_on_change_only(self, membership: Membership) -> None:
        start = membership.generation
        await membership.register(worker_info(0))
        after_join = membership.generation
        assert after_join > start
        await membership.register(worker_info(0))  # the same entry again: no change
        assert membership.generation == after_join
        await membership.update(worker_info(0, used_bytes=1))
        assert membership.generation > after_join

    async def test_view_is_sorted_and_a_copy(self, membership: Membership) -> None:
        for n in (3, 0, 2):
            await membership.register(worker_info(n))
        view = await membership.workers()
        ids = [w.worker_id for w in view]
        assert ids == sorted(ids)
        view.clear()
        assert len(await membership.workers()) >= 3

    async def test_subscribe_replays_then_sees_changes(self, membership: Membership) -> None:
        recorder = Recorder()
        unsubscribe = membership.subscribe(recorder)
        assert recorder.views == [await membership.workers()]
        info = worker_info(1)
        await membership.register(info)
        await recorder.wait_for(lambda v: info in v, self.propagation_timeout)
        assert recorder.last == await membership.workers()
        unsubscribe()
        calls = len(recorder.views)
        await membership.update(info.with_usage(77))
        await asyncio.sleep(0.05)
        assert len(recorder.views) == calls

    async def test_subscribe_without_replay(self, membership: Membership) -> None:
        recorder = Recorder()
        membership.subscribe(recorder, replay=False)
        assert recorder.views == []
        await membership.register(worker_info(4))
        await recorder.wait_for(lambda v: worker_info(4) in v, self.propagation_timeout)

    async def test_failing_subscriber_does_not_stop_others(self, membership: Membership) -> None:
        def broken(view: list[WorkerInfo]) -> None:
            raise RuntimeError("subscriber bug")

        membership.subscribe(broken)
        recorder = Recorder()
        membership.subscribe(recorder)
        await membership.register(worker_info(5))
        await recorder.wait_for(lambda v: worker_info(5) in v, self.propagation_timeout)
        assert membership.healthy

    async def test_deregister_unknown_is_noop(self, membership: Membership) -> None:
        before = await membership.workers()
        await membership.deregister("f" * 32)
        assert await membership.workers() == before

    async def test_close_is_idempotent(self, membership_factory: MembershipFactory) -> None:
        m = await membership_factory()
        await m.close()
        await m.close()


class DynamicMembershipContract(MembershipContract):
    """Workers join and leave; the factory's instances share one backend."""

    async def test_starts_empty(self, membership: Membership) -> None:
        assert await membership.workers() == []

    async def test_deregister_removes(self, membership: Membership) -> None:
        info = worker_info(0)
        await membership.register(info)
        await membership.deregister(info.worker_id)
        assert info.worker_id not in by_id(await membership.workers())
        await membership.deregister(info.worker_id)  # twice is fine

    async def test_update_after_deregister_is_not_found(self, membership: Membership) -> None:
        await membership.register(worker_info(0))
        await membership.deregister(worker_info(0).worker_id)
        with pytest.raises(NotFound):
            await membership.update(worker_info(0))

    async def test_subscriber_sees_join_and_leave(self, membership: Membership) -> None:
        recorder = Recorder()
        membership.subscribe(recorder)
        a, b = worker_info(0), worker_info(1)
        await membership.register(a)
        await membership.register(b)
        await recorder.wait_for(lambda v: v == [a, b], self.propagation_timeout)
        mark = recorder.mark()
        await membership.deregister(a.worker_id)
        await recorder.wait_for(lambda v: v == [b], self.propagation_timeout, since=mark)

    async def test_peer_sees_join_update_and_leave(
        self, membership_factory: MembershipFactory
    ) -> None:
        a = await membership_factory()
        b = await membership_factory()
        recorder = Recorder()
        b.subscribe(recorder)
        info = worker_info(2)
        await a.register(info)
        await recorder.wait_for(lambda v: info in v, self.propagation_timeout)
        assert info in await b.workers()
        updated = info.with_usage(999)
        await a.update(updated)
        await recorder.wait_for(lambda v: updated in v, self.propagation_timeout)
        mark = recorder.mark()
        await a.deregister(info.worker_id)
        await recorder.wait_for(lambda v: v == [], self.propagation_timeout, since=mark)
        assert await b.workers() == []

    async def test_instances_see_each_other(self, membership_factory: MembershipFactory) -> None:
        a = await membership_factory()
        b = await membership_factory()
        await a.register(worker_info(0))
        await b.register(worker_info(1))
        expected = [worker_info(0), worker_info(1)]

        async def both_see_both() -> bool:
            return await a.workers() == expected and await b.workers() == expected

        await eventually(both_see_both, self.propagation_timeout, "both instances see both workers")

    async def test_close_makes_own_workers_leave(
        self, membership_factory: MembershipFactory
    ) -> None:
        a = await membership_factory()
        b = await membership_factory()
        await a.register(worker_info(0))
        await b.register(worker_info(1))
        await eventually(
            lambda: _has(b, worker_info(0)), self.propagation_timeout, "b sees a's worker"
        )
        await a.close()

        async def only_b_left() -> bool:
            return await b.workers() == [worker_info(1)]

        await eventually(only_b_left, self.propagation_timeout, "a's worker left on close")

    async def test_deregister_of_another_instances_worker(
        self, membership_factory: MembershipFactory
    ) -> None:
        a = await membership_factory()
        b = await membership_factory()
        await a.register(worker_info(3))
        await eventually(lambda: _has(b, worker_info(3)), self.propagation_timeout, "b sees it")
        await b.deregister(worker_info(3).worker_id)
        assert await b.workers() == []

        async def gone_for_a() -> bool:
            return await a.workers() == []

        await eventually(gone_for_a, self.propagation_timeout, "a sees the removal")

    async def test_same_worker_id_from_another_instance_replaces(
        self, membership_factory: MembershipFactory
    ) -> None:
        """A restarted worker (same id, maybe a new address) takes its old entry over."""
        old = await membership_factory()
        new = await membership_factory()
        await old.register(worker_info(0))
        moved = worker_info(0, endpoint=ENDPOINTS[5], started_at=1_800_000_000.0)
        await new.register(moved)
        assert await new.workers() == [moved]

        async def old_sees_move() -> bool:
            return await old.workers() == [moved]

        await eventually(old_sees_move, self.propagation_timeout, "the old instance sees the move")
        await old.close()  # the old session ends: the entry now belongs to the new one
        await asyncio.sleep(0.1)
        assert await new.workers() == [moved]


async def _has(m: Membership, info: WorkerInfo) -> bool:
    return info in await m.workers()


class ClusterStoreContract:
    """The KV API; ``membership_factory`` must make ``ClusterStore`` instances on one backend."""

    propagation_timeout: ClassVar[float] = 5.0

    @pytest.fixture
    async def store(self, membership_factory: MembershipFactory) -> ClusterStore:
        m = await membership_factory()
        assert isinstance(m, ClusterStore)
        return m

    async def _peer(self, factory: MembershipFactory) -> ClusterStore:
        m = await factory()
        assert isinstance(m, ClusterStore)
        return m

    async def test_put_get(self, store: ClusterStore) -> None:
        assert await store.kv_get("jobs/missing") is None
        await store.kv_put("jobs/1", b'{"state":"running"}')
        assert await store.kv_get("jobs/1") == b'{"state":"running"}'
        await store.kv_put("jobs/1", b"done")
        assert await store.kv_get("jobs/1") == b"done"

    async def test_binary_and_empty_values(self, store: ClusterStore) -> None:
        data = bytes(range(256)) * 4
        await store.kv_put("blob", data)
        assert await store.kv_get("blob") == data
        await store.kv_put("empty", b"")
        assert await store.kv_get("empty") == b""

    async def test_list_prefix(self, store: ClusterStore) -> None:
        await store.kv_put("jobs/b", b"2")
        await store.kv_put("jobs/a", b"1")
        await store.kv_put("other/c", b"3")
        jobs = await store.kv_list("jobs/")
        assert jobs == {"jobs/a": b"1", "jobs/b": b"2"}
        assert list(jobs) == ["jobs/a", "jobs/b"]
        assert await store.kv_list("nothing/") == {}
        assert await store.kv_list() == {"jobs/a": b"1", "jobs/b": b"2", "other/c": b"3"}

    async def test_kv_does_not_show_workers(
        self, store: ClusterStore, membership_factory: MembershipFactory
    ) -> None:
        assert isinstance(store, Membership)
        await store.register(worker_info(0))
        await store.kv_put("jobs/x", b"1")
        assert await store.kv_list() == {"jobs/x": b"1"}

    async def test_delete(self, store: ClusterStore) -> None:
        await store.kv_put("jobs/1", b"x")
        assert await store.kv_delete("jobs/1") is True
        assert await store.kv_get("jobs/1") is None
        assert await store.kv_delete("jobs/1") is False

    async def test_create_only_if_absent(self, store: ClusterStore) -> None:
        assert await store.kv_create("jobs/claim", b"first") is True
        assert await store.kv_create("jobs/claim", b"second") is False
        assert await store.kv_get("jobs/claim") == b"first"
        await store.kv_delete("jobs/claim")
        assert await store.kv_create("jobs/claim", b"third") is True

    async def test_peer_sees_values(
        self, store: ClusterStore, membership_factory: MembershipFactory
    ) -> None:
        peer = await self._peer(membership_factory)
        await store.kv_put("jobs/shared", b"v")
        assert await peer.kv_get("jobs/shared") == b"v"
        assert await peer.kv_create("jobs/shared", b"w") is False

    async def test_ephemeral_entries_leave_with_their_instance(
        self, membership_factory: MembershipFactory
    ) -> None:
        owner = await self._peer(membership_factory)
        other = await self._peer(membership_factory)
        await owner.kv_put("jobs/lock", b"owner", ephemeral=True)
        assert await owner.kv_create("jobs/claim", b"owner", ephemeral=True) is True
        await owner.kv_put("jobs/durable", b"stays")
        assert await other.kv_get("jobs/lock") == b"owner"
        assert isinstance(owner, Membership)
        await owner.close()

        async def ephemeral_gone() -> bool:
            return await other.kv_list("jobs/") == {"jobs/durable": b"stays"}

        await eventually(ephemeral_gone, self.propagation_timeout, "ephemeral entries removed")

    async def test_invalid_keys(self, store: ClusterStore) -> None:
        for key in ("", "/abs", "workers/x", "a\x00b"):
            with pytest.raises(InvalidArgument):
                await store.kv_put(key, b"x")
            with pytest.raises(InvalidArgument):
                await store.kv_get(key)
        with pytest.raises(InvalidArgument):
            await store.kv_list("workers/")

    async def test_value_too_large(self, store: ClusterStore) -> None:
        with pytest.raises(RequestTooLarge):
            await store.kv_put("big", b"x" * (MAX_VALUE_BYTES + 1))
        await store.kv_put("big", b"x" * MAX_VALUE_BYTES)
        got = await store.kv_get("big")
        assert got is not None and len(got) == MAX_VALUE_BYTES
