"""RetryingUnderStore over FaultInjectingUnderStore: what is retried, how often, how long."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from depot.core.config import UfsConfig
from depot.core.errors import (
    DepotError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    StaleVersion,
    Throttled,
    Timeout,
    Unavailable,
)
from depot.testing.ufs_contract import as_bytes
from depot.ufs import FaultInjectingUnderStore, MemoryUnderStore, RetryingUnderStore
from depot.ufs.retry import is_retryable


class Sleeps:
    """Records the delays instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture
async def faulty() -> FaultInjectingUnderStore:
    store = FaultInjectingUnderStore(MemoryUnderStore())
    await store.inner.put("k", b"0123456789")
    return store


def retrying(
    inner: FaultInjectingUnderStore, retries: int = 5, *, rng: float = 0.5
) -> tuple[RetryingUnderStore, Sleeps]:
    sleeps = Sleeps()
    store = RetryingUnderStore(inner, retries, 0.1, 1.0, sleep=sleeps, rng=lambda: rng)
    return store, sleeps


@pytest.mark.parametrize("error", [Throttled("slow down"), Unavailable("503"), Timeout("t/o")])
async def test_transient_errors_are_retried(
    faulty: FaultInjectingUnderStore, error: DepotError
) -> None:
    store, sleeps = retrying(faulty)
    faulty.fail_next(2, error, ops={"get_range"})
    assert as_bytes(await store.get_range("k", 2, 5)) == b"234"
    assert faulty.calls["get_range"] == 3
    assert store.retried == 2
    assert len(sleeps.delays) == 2


async def test_attempts_are_bounded(faulty: FaultInjectingUnderStore) -> None:
    store, sleeps = retrying(faulty, retries=3)
    faulty.fail_next(100, Unavailable("down"))
    with pytest.raises(Unavailable):
        await store.head("k")
    assert faulty.calls["head"] == 4  # the first attempt and three retries
    assert len(sleeps.delays) == 3


async def test_zero_retries_means_one_attempt(faulty: FaultInjectingUnderStore) -> None:
    store, sleeps = retrying(faulty, retries=0)
    faulty.fail_next(1, Throttled("x"))
    with pytest.raises(Throttled):
        await store.get("k")
    assert faulty.calls["get"] == 1 and sleeps.delays == []


@pytest.mark.parametrize(
    "error",
    [NotFound("no"), PermissionDenied("no"), StaleVersion("changed"), InvalidArgument("bad")],
)
async def test_permanent_errors_pass_through_at_once(
    faulty: FaultInjectingUnderStore, error: DepotError
) -> None:
    store, sleeps = retrying(faulty)
    faulty.fail_next(1, error)
    with pytest.raises(type(error)):
        await store.get_range("k", 0, 1)
    assert faulty.calls["get_range"] == 1
    assert sleeps.delays == [] and store.retried == 0


async def test_foreign_exceptions_are_not_retried(faulty: FaultInjectingUnderStore) -> None:
    store, sleeps = retrying(faulty)
    faulty.fail_next(1, RuntimeError("bug"))
    with pytest.raises(RuntimeError):
        await store.head("k")
    assert faulty.calls["head"] == 1 and sleeps.delays == []


def test_stale_version_is_never_retryable() -> None:
    assert StaleVersion.retryable  # the class says "try again", but only after re-reading
    assert not is_retryable(StaleVersion("x"))
    assert is_retryable(Throttled("x"))
    assert not is_retryable(NotFound("x"))


async def test_backoff_doubles_up_to_the_cap(faulty: FaultInjectingUnderStore) -> None:
    store, sleeps = retrying(faulty, retries=6, rng=1.0)  # rng=1.0: the top of each window
    faulty.fail_next(6, Throttled("x"))
    await store.head("k")
    assert sleeps.delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


async def test_backoff_has_full_jitter() -> None:
    store = RetryingUnderStore(MemoryUnderStore(), 10, 0.1, 1.0)
    for attempt in range(8):
        cap = min(1.0, 0.1 * 2**attempt)
        delays = [store.backoff(attempt) for _ in range(200)]
        assert all(0.0 <= d <= cap for d in delays)
        assert min(delays) < cap * 0.2 and max(delays) > cap * 0.8
    assert store.backoff(10_000) <= 1.0  # no overflow far out


async def test_real_backoff_time_is_bounded(faulty: FaultInjectingUnderStore) -> None:
    store = RetryingUnderStore(faulty, 5, 0.01, 0.02)
    faulty.fail_next(5, Unavailable("x"))
    started = time.monotonic()
    await store.head("k")
    elapsed = time.monotonic() - started
    assert elapsed < 0.5  # at most 0.01 + 0.02 * 4 of sleep, plus scheduling
    assert store.retried == 5


async def test_put_multipart_is_not_retried(faulty: FaultInjectingUnderStore) -> None:
    store, _ = retrying(faulty)
    faulty.fail_next(1, Unavailable("x"), ops={"put_multipart"})

    async def chunks() -> AsyncIterator[bytes]:
        yield b"abc"

    with pytest.raises(Unavailable):
        await store.put_multipart("m", chunks())
    assert faulty.calls["put_multipart"] == 1
    info = await store.put_multipart("m", chunks())
    assert info.size == 3


async def test_writes_and_lists_are_retried(faulty: FaultInjectingUnderStore) -> None:
    store, _ = retrying(faulty)
    faulty.fail_next(1, Throttled("x"), ops={"put", "delete", "list"})
    faulty.fail_next(1, Throttled("x"), ops={"put", "delete", "list"})
    faulty.fail_next(1, Throttled("x"), ops={"put", "delete", "list"})
    await store.put("new", b"1")
    page = await store.list("")
    await store.delete("new")
    assert [o.key for o in page.objects] == ["k", "new"]
    assert store.retried == 3
    with pytest.raises(NotFound):
        await store.head("new")


async def test_on_retry_hook(faulty: FaultInjectingUnderStore) -> None:
    seen: list[tuple[str, str, str, int, float]] = []
    store = RetryingUnderStore(
        faulty,
        3,
        0.5,
        0.5,
        sleep=Sleeps(),
        rng=lambda: 1.0,
        on_retry=lambda op, key, exc, attempt, delay: seen.append(
            (op, key, exc.code, attempt, delay)
        ),
    )
    faulty.fail_next(1, Throttled("x"))
    await store.get("k")
    assert seen == [("get", "k", "Throttled", 1, 0.5)]


def test_from_config() -> None:
    config = UfsConfig(retries=7, backoff_base=0.2, backoff_max=3.0)
    store = RetryingUnderStore.from_config(MemoryUnderStore(uri="memory://x"), config)
    assert (store.retries, store.backoff_base, store.backoff_max) == (7, 0.2, 3.0)
    assert store.uri == "memory://x"
    with pytest.raises(ValueError):
        RetryingUnderStore(MemoryUnderStore(), -1)


# --- the fault injector itself ---------------------------------------------------------------


async def test_faults_apply_to_chosen_operations(faulty: FaultInjectingUnderStore) -> None:
    faulty.fail_next(1, Throttled("x"), ops={"head"})
    assert as_bytes(await faulty.get("k")) == b"0123456789"
    with pytest.raises(Throttled):
        await faulty.head("k")
    assert (await faulty.head("k")).size == 10
    assert faulty.injected == 1 and faulty.pending_faults == 0


async def test_fault_factories_and_fresh_copies(faulty: FaultInjectingUnderStore) -> None:
    faulty.fail_next(2, lambda: Unavailable("made"))
    errors = []
    for _ in range(2):
        with pytest.raises(Unavailable) as info:
            await faulty.head("k")
        errors.append(info.value)
    assert errors[0] is not errors[1]
    shared = NotFound("same", "p")
    faulty.fail_next(1, shared)
    with pytest.raises(NotFound) as copy_info:
        await faulty.head("k")
    assert copy_info.value is not shared and copy_info.value.path == "p"


async def test_failed_write_changes_nothing(faulty: FaultInjectingUnderStore) -> None:
    faulty.fail_next(1, Unavailable("x"), ops={"put"})
    with pytest.raises(Unavailable):
        await faulty.put("k", b"new")
    assert as_bytes(await faulty.get("k")) == b"0123456789"


async def test_latency(faulty: FaultInjectingUnderStore) -> None:
    faulty.set_latency(0.05, ops={"head"})
    started = time.monotonic()
    await faulty.head("k")
    assert time.monotonic() - started >= 0.045
    started = time.monotonic()
    await faulty.get("k")
    assert time.monotonic() - started < 0.04
    faulty.clear()
    started = time.monotonic()
    await faulty.head("k")
    assert time.monotonic() - started < 0.04
    assert faulty.calls["head"] == 2 and faulty.calls["get"] == 1


def test_unknown_operation_is_refused() -> None:
    store = FaultInjectingUnderStore(MemoryUnderStore())
    with pytest.raises(ValueError, match="nope"):
        store.fail_next(1, Throttled("x"), ops={"nope"})
    with pytest.raises(ValueError):
        store.fail_next(-1, Throttled("x"))


async def _stream(store: RetryingUnderStore, start: int, end: int, etag: str | None) -> bytes:
    out = bytearray()
    async for chunk in store.get_range_stream("k", start, end, etag=etag):
        out += memoryview(chunk)
    return bytes(out)


async def test_stream_failing_before_its_first_byte_is_retried(
    faulty: FaultInjectingUnderStore,
) -> None:
    store, sleeps = retrying(faulty)
    faulty.stream_chunks(3)
    faulty.fail_next(2, Throttled("slow down"), ops={"get_range"})
    assert await _stream(store, 1, 9, None) == b"12345678"
    assert faulty.calls["get_range_stream"] == 3 and store.retried == 2
    assert len(sleeps.delays) == 2


async def test_pinned_stream_broken_off_resumes_where_it_stopped(
    faulty: FaultInjectingUnderStore,
) -> None:
    store, _ = retrying(faulty)
    etag = (await faulty.head("k")).etag
    faulty.stream_chunks(2)
    faulty.fail_stream(after=4, error=Unavailable("connection reset"), count=2)
    # Bytes 1-4 come from the first stream, 5-8 from the second (broken too), 9 from a third.
    assert await _stream(store, 1, 10, etag) == b"123456789"
    assert faulty.calls["get_range_stream"] == 3 and store.retried == 2


async def test_unpinned_stream_broken_off_is_not_resumed(
    faulty: FaultInjectingUnderStore,
) -> None:
    store, _ = retrying(faulty)
    faulty.stream_chunks(2)
    faulty.fail_stream(after=4, error=Unavailable("connection reset"))
    got = bytearray()
    with pytest.raises(Unavailable):
        async for chunk in store.get_range_stream("k", 0, 10):
            got += memoryview(chunk)
    assert bytes(got) == b"0123"  # the rest could be of another version: not resumed
    assert faulty.calls["get_range_stream"] == 1 and store.retried == 0


async def test_stream_of_another_version_is_not_retried(
    faulty: FaultInjectingUnderStore,
) -> None:
    store, _ = retrying(faulty)
    old = (await faulty.head("k")).etag
    await faulty.put("k", b"abcdefghij")
    with pytest.raises(StaleVersion):
        await _stream(store, 0, 10, old)
    assert store.retried == 0
