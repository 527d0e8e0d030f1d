"""The spool of a file written through a mount (``depot.fuse.staging``), without a mount.

The stored file is a bytes object behind a fake ``Source``; a bytearray is the model of what the
file must hold after any sequence of writes, appends and truncations.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from depot.core.errors import StaleVersion, Unavailable
from depot.fuse import staging
from depot.fuse.staging import Staged


class Store:
    """The stored versions of one file, read in ranges; can fail, cut reads short, or have its
    version replaced under a reader."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.version = 1
        self.pinned = 0
        self.refreshes = 0
        self.calls: list[tuple[int, int]] = []
        self.fail_after: int | None = None  # fail every call after this many
        self.short = False
        self.gate: asyncio.Event | None = None
        self.replace_at: tuple[int, bytes] | None = None  # (call number, new content)

    async def refresh(self) -> int:
        self.refreshes += 1
        self.pinned = self.version
        return len(self.data)

    async def lend_slot(self) -> None:
        return None  # no worker here: spools are the mount's own

    async def read_into(self, start: int, end: int, out: memoryview) -> int:
        self.calls.append((start, end))
        if self.gate is not None:
            await self.gate.wait()
        if self.replace_at is not None and len(self.calls) == self.replace_at[0]:
            self.data, self.version = self.replace_at[1], self.version + 1
        if self.fail_after is not None and len(self.calls) > self.fail_after:
            raise Unavailable("the under store does not answer", "/f")
        if self.pinned and self.pinned != self.version:
            raise StaleVersion("replaced", "/f")
        chunk = self.data[start:end]
        if self.short:
            chunk = chunk[: len(chunk) // 2]
        out[: len(chunk)] = chunk
        return len(chunk)


def spool_bytes(staged: Staged) -> bytes:
    staged.file.seek(0)
    return staged.file.read()


def existing(tmp_path: Path, data: bytes) -> tuple[Staged, Store]:
    return Staged("/f", str(tmp_path), base_size=len(data), local=False), Store(data)


async def test_untouched_file_reads_the_store_and_copies_nothing(tmp_path: Path) -> None:
    staged, store = existing(tmp_path, b"0123456789")
    assert not staged.dirty and staged.size == 10
    assert await staged.read(3, 4, store) == b"3456"
    assert await staged.read(8, 100, store) == b"89"
    assert await staged.read(10, 5, store) == b""
    assert not staged.local and spool_bytes(staged) == b""
    staged.close()


async def test_append_copies_once_then_writes_at_the_end(tmp_path: Path) -> None:
    staged, store = existing(tmp_path, b"0123456789")
    assert await staged.write(None, b"ab", store) == 2
    assert await staged.write(3, b"X", store) == 1  # into the middle
    assert await staged.write(None, b"cd", store) == 2  # appends ignore the last offset
    assert staged.dirty and staged.local and staged.size == 14
    assert spool_bytes(staged) == b"012X456789abcd"
    assert await staged.read(10, 10, store) == b"abcd"
    assert store.calls == [(0, 10)]  # one copy, then the spool only
    staged.close()


async def test_sparse_write_and_truncate(tmp_path: Path) -> None:
    staged, store = existing(tmp_path, b"abc")
    await staged.write(8, b"Z", store)
    assert staged.size == 9
    assert await staged.read(0, 20, store) == b"abc\0\0\0\0\0Z"
    await staged.truncate(2, store)
    assert await staged.read(0, 20, store) == b"ab"
    await staged.truncate(5, store)
    assert await staged.read(0, 20, store) == b"ab\0\0\0"
    assert staged.size == 5 and spool_bytes(staged) == b"ab\0\0\0"
    staged.close()


async def test_truncate_to_zero_needs_no_copy(tmp_path: Path) -> None:
    staged, store = existing(tmp_path, b"old bytes")
    await staged.truncate(0, store)
    await staged.write(0, b"new", store)
    assert store.calls == [] and spool_bytes(staged) == b"new" and staged.dirty
    staged.close()


async def test_large_copy_goes_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staging, "COPY_CHUNK", 1000)
    data = bytes(range(256)) * 20  # 5120 bytes
    staged, store = existing(tmp_path, data)
    await staged.write(len(data), b"!", store)
    assert store.calls == [(0, 1000), (1000, 2000), (2000, 3000), (3000, 4000), (4000, 5000),
                           (5000, 5120)]
    assert spool_bytes(staged) == data + b"!"
    staged.close()


async def test_failed_copy_changes_nothing_and_can_be_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(staging, "COPY_CHUNK", 4)
    staged, store = existing(tmp_path, b"0123456789")
    store.fail_after = 1  # the first chunk arrives, the second fails
    with pytest.raises(Unavailable) as info:
        await staged.write(None, b"tail", store)
    assert info.value.errno == errno.EHOSTUNREACH  # the mount answers EIO (depot.fuse.errors)
    with pytest.raises(Unavailable):
        await staged.truncate(3, store)
    # Nothing of the partial copy is kept, read or marked for upload.
    assert not staged.local and not staged.dirty and staged.size == 10
    assert spool_bytes(staged) == b""
    store.fail_after = None
    assert await staged.read(0, 10, store) == b"0123456789"
    await staged.write(None, b"tail", store)
    assert spool_bytes(staged) == b"0123456789tail" and staged.dirty
    staged.close()


async def test_store_shorter_than_its_size_is_stale(tmp_path: Path) -> None:
    staged, store = existing(tmp_path, b"0123456789")
    store.short = True
    with pytest.raises(StaleVersion):
        await staged.write(0, b"x", store)
    assert not staged.dirty and spool_bytes(staged) == b""
    staged.close()


async def test_writes_wait_for_the_copy(tmp_path: Path) -> None:
    """Concurrent writers (two handles of one file): one copy, and no write is overwritten by it."""
    staged, store = existing(tmp_path, b"0123456789")
    store.gate = asyncio.Event()
    first = asyncio.create_task(staged.write(0, b"AB", store))
    second = asyncio.create_task(staged.write(None, b"yz", store))
    third = asyncio.create_task(staged.truncate(12, store))
    await asyncio.sleep(0.01)
    assert not first.done() and not second.done() and not third.done()
    store.gate.set()
    await asyncio.gather(first, second, third)
    assert store.calls == [(0, 10)]
    assert spool_bytes(staged) == b"AB23456789yz"
    staged.close()


async def test_new_file_is_local_and_dirty(tmp_path: Path) -> None:
    staged = Staged("/n", str(tmp_path), base_size=123, local=True)
    assert staged.size == 0 and staged.dirty  # uploaded on close even if nothing is written

    store = Store(b"never read")
    await staged.write(0, b"abc", store)
    await staged.write(None, b"de", store)
    assert await staged.read(0, 10, store) == b"abcde"
    assert store.calls == [] and store.refreshes == 0  # a new file has nothing to copy
    staged.close()


async def test_copy_restarts_when_the_version_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write-back upload landing (or another writer) replaces the version during the copy: the
    copy starts over from the new version, never mixing the two."""
    monkeypatch.setattr(staging, "COPY_CHUNK", 4)
    staged, store = existing(tmp_path, b"0123456789")
    store.replace_at = (2, b"abcdefghijklmn")  # the second chunk finds a new version
    await staged.write(None, b"!", store)
    assert spool_bytes(staged) == b"abcdefghijklmn!" and store.refreshes == 2
    assert store.calls == [(0, 4), (4, 8), (0, 4), (4, 8), (8, 12), (12, 14)]
    staged.close()


async def test_copy_gives_up_on_a_version_that_keeps_changing(tmp_path: Path) -> None:
    staged, store = existing(tmp_path, b"0123456789")
    original = store.read_into

    async def replaced_each_time(start: int, end: int, out: memoryview) -> int:
        store.version += 1
        return await original(start, end, out)

    store.read_into = replaced_each_time  # type: ignore[method-assign]
    with pytest.raises(StaleVersion):
        await staged.write(0, b"x", store)
    assert store.refreshes == staging.COPY_ATTEMPTS
    assert not staged.local and not staged.dirty and spool_bytes(staged) == b""
    staged.close()


_ops = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 300), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("append"), st.just(0), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("truncate"), st.integers(0, 300), st.just(b"")),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base=st.binary(max_size=200), ops=st.lists(_ops, max_size=12), chunk=st.integers(1, 64))
def test_spool_matches_a_model(
    tmp_path: Path, base: bytes, ops: list[tuple[str, int, bytes]], chunk: int
) -> None:
    async def run() -> None:
        staged, store = existing(tmp_path, base)
        model = bytearray(base)
        old = staging.COPY_CHUNK
        staging.COPY_CHUNK = chunk
        try:
            for op, offset, data in ops:
                if op == "write":
                    await staged.write(offset, data, store)
                    if offset > len(model):
                        model += bytes(offset - len(model))
                    model[offset : offset + len(data)] = data
                elif op == "append":
                    await staged.write(None, data, store)
                    model += data
                else:
                    await staged.truncate(offset, store)
                    model = model[:offset] + bytes(max(0, offset - len(model)))
                assert staged.size == len(model)
                assert await staged.read(0, len(model) + 10, store) == bytes(model)
            assert staged.dirty == bool(ops)
            if ops:
                assert spool_bytes(staged) == bytes(model)
        finally:
            staging.COPY_CHUNK = old
            staged.close()

    asyncio.run(run())
