"""Streaming fills: a cold read's first bytes leave before the whole page is in from the UFS.

The UFS here is an in-memory store behind the fault wrapper, which cuts each streamed range in
chunks and can stop a stream part-way (a gate the test opens) or break it (a lost connection):
a slow object store, made deterministic. Pages go to a real local page store, so "cached" also
means "written with its checksum and read back verified".
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from depot.core.errors import StaleVersion, Unavailable
from depot.core.types import ByteRange, PageId
from depot.metastore.store import MetadataStore
from depot.namespace.mounts import Mount, MountTable
from depot.pagestore import LocalPageStore
from depot.testing.ufs_contract import payload
from depot.ufs import FaultInjectingUnderStore, MemoryUnderStore
from depot.ufs.base import Buffer, ObjectInfo
from depot.ufs.memory import MemoryBucket
from depot.worker.service import OpenedFile, ReadThroughService

PAGE = 1024 * 1024
CHUNK = 64 * 1024
SIZE = 3 * PAGE + 1234
DATA = payload(SIZE, seed=3)


@dataclass
class Env:
    bucket: MemoryBucket
    ufs: FaultInjectingUnderStore
    pages: LocalPageStore
    service: ReadThroughService

    async def open(self) -> OpenedFile:
        return await self.service.open("/f.bin")

    def page(self, opened: OpenedFile, index: int) -> PageId:
        return PageId(opened.file_id.key, index)

    async def cached_page(self, opened: OpenedFile, index: int) -> bytes | None:
        """The page as the page store has it, checksum verified (None: not cached)."""
        page = self.page(opened, index)
        for _ in range(500):  # filled pages reach the store in the background
            if self.pages.contains(page) and page not in self.service._filling:
                break
            await asyncio.sleep(0.01)
        length = self.pages.page_length(page)
        if length is None:
            return None
        out = bytearray(length)
        if not await self.pages.read_into(page, 0, memoryview(out)):
            return None
        return bytes(out)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    bucket = MemoryBucket()
    bucket.store("f.bin", DATA)
    ufs = FaultInjectingUnderStore(MemoryUnderStore(bucket))
    ufs.stream_chunks(CHUNK)
    pages = await LocalPageStore.open([(tmp_path / "pages", 64 * PAGE)], PAGE)
    meta = MetadataStore(tmp_path / "meta")
    service = ReadThroughService(
        MountTable([Mount("/", "memory://b")]), pages, meta, lambda mount: ufs,
        prefetch_pages=0,
    )
    yield Env(bucket, ufs, pages, service)
    ufs.clear()  # opens any gate left closed
    await service.close()
    await pages.close()
    meta.close()


def reader(env: Env, opened: OpenedFile, start: int, end: int) -> AsyncGenerator[memoryview, None]:
    return env.service.read_chunks(opened, ByteRange(start, end), bytearray(PAGE))


async def read_all(env: Env, opened: OpenedFile, start: int, end: int) -> bytes:
    out = bytearray()
    async for chunk in reader(env, opened, start, end):
        out += chunk
    return bytes(out)


async def test_first_bytes_leave_before_the_page_is_whole(env: Env) -> None:
    gate = env.ufs.hold_streams(after=CHUNK)
    opened = await env.open()
    chunks = reader(env, opened, 0, 4096)
    first = await asyncio.wait_for(anext(chunks), 5)
    assert bytes(first) == DATA[:4096]
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(chunks), 5)
    # The UFS has sent one chunk of the page and is stalled: the reader did not wait for it.
    page = env.page(opened, 0)
    assert page in env.service._partial and env.service._partial[page].received == CHUNK
    assert not env.pages.contains(page)
    gate.set()
    # The page is cached once whole, with its checksum, and only then.
    assert await env.cached_page(opened, 0) == DATA[:PAGE]
    assert page not in env.service._partial
    assert env.ufs.calls["get_range"] == 1 and env.service.stats.ufs_streamed == 1
    assert env.service.stats.misses == 1 and env.service.stats.bytes_from_ufs == 4096
    # And it is a hit from now on.
    assert await read_all(env, opened, 10, 5000) == DATA[10:5000]
    assert env.service.stats.hits == 1 and env.ufs.calls["get_range"] == 1


async def test_first_byte_does_not_wait_for_a_slow_page(env: Env) -> None:
    """The issue's case in time: 16 chunks 40 ms apart make a 600 ms page; 4 KiB need one."""
    env.ufs.stream_chunks(CHUNK, delay=0.04)
    opened = await env.open()
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await read_all(env, opened, 0, 4096) == DATA[:4096]
    first = loop.time() - began
    assert await env.cached_page(opened, 0) == DATA[:PAGE]
    whole = loop.time() - began
    assert whole >= 0.5 and first < whole / 3, (first, whole)


async def test_a_reader_gets_each_stretch_as_it_arrives(env: Env) -> None:
    gates = [env.ufs.hold_streams(after=n * CHUNK) for n in (1, 2)]
    opened = await env.open()
    chunks = reader(env, opened, 100, PAGE)
    got = bytearray(await asyncio.wait_for(anext(chunks), 5))
    assert bytes(got) == DATA[100:CHUNK]
    gates[0].set()
    got += await asyncio.wait_for(anext(chunks), 5)
    assert bytes(got) == DATA[100 : 2 * CHUNK]
    gates[1].set()
    async for chunk in chunks:
        got += chunk
    assert bytes(got) == DATA[100:PAGE]
    assert await env.cached_page(opened, 0) == DATA[:PAGE]


async def test_concurrent_readers_of_a_cold_page_cost_one_ufs_read(env: Env) -> None:
    gate = env.ufs.hold_streams(after=2 * CHUNK)
    opened = await env.open()
    early = [(0, 4096), (5000, 9000), (CHUNK, 2 * CHUNK)]
    late = [(0, PAGE), (PAGE - 10, PAGE + 10), (3 * CHUNK, 3 * CHUNK + 1)]
    firsts = await asyncio.gather(*(read_all(env, opened, a, b) for a, b in early))
    assert firsts == [DATA[a:b] for a, b in early]  # covered already: served while stalled
    waiting = [asyncio.ensure_future(read_all(env, opened, a, b)) for a, b in late]
    load = asyncio.ensure_future(env.service.load_range(opened, 0, PAGE))
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in [*waiting, load])
    gate.set()
    assert await asyncio.gather(*waiting) == [DATA[a:b] for a, b in late]
    assert (await load)["cached"] == 1
    # Page 0 once (streamed) and page 1 once (for the reader that crosses into it).
    assert env.ufs.calls["get_range"] == 2 and env.service.stats.ufs_streamed == 1
    assert await env.cached_page(opened, 0) == DATA[:PAGE]


async def test_a_failure_mid_page_is_an_error_never_partial_data(env: Env) -> None:
    env.ufs.fail_stream(after=2 * CHUNK, error=Unavailable("connection reset by the store"))
    gate = env.ufs.hold_streams(after=2 * CHUNK)
    opened = await env.open()
    # A range below the break was in before it: correct bytes, at once.
    assert await read_all(env, opened, 0, 4096) == DATA[:4096]
    beyond = asyncio.ensure_future(read_all(env, opened, 3 * CHUNK, 4 * CHUNK))
    across = reader(env, opened, 0, PAGE)
    head = bytes(await anext(across))
    assert head == DATA[: len(head)]
    gate.set()
    with pytest.raises(Unavailable):
        await beyond  # not one byte of its range
    with pytest.raises(Unavailable):
        async for chunk in across:  # whatever came before the break is right; then the error
            assert bytes(chunk) == DATA[len(head) : len(head) + len(chunk)]
            head += bytes(chunk)
    assert len(head) <= 2 * CHUNK
    page = env.page(opened, 0)
    assert not env.pages.contains(page) and page not in env.service._partial
    # The next read fetches the page again, whole and right.
    assert await read_all(env, opened, 0, PAGE) == DATA[:PAGE]
    assert await env.cached_page(opened, 0) == DATA[:PAGE]
    assert env.ufs.calls["get_range"] == 2


async def test_a_changed_object_is_stale_version(env: Env) -> None:
    opened = await env.open()
    env.bucket.store("f.bin", payload(SIZE, seed=4))  # overwritten behind the worker
    with pytest.raises(StaleVersion):
        await read_all(env, opened, 0, 4096)
    assert not env.pages.contains(env.page(opened, 0))
    # The version is forgotten: a new open sees the new object.
    reopened = await env.open()
    assert reopened.file_id != opened.file_id
    assert await read_all(env, reopened, 0, 4096) == payload(SIZE, seed=4)[:4096]


class _WrongLength(FaultInjectingUnderStore):
    """Streams that end ``delta`` bytes early or run ``delta`` bytes past their end, under the
    right ETag (a broken store, or an object changed in place)."""

    delta = 0

    async def get_range_stream(
        self, key: str, start: int, end: int, *, etag: str | None = None
    ) -> AsyncGenerator[Buffer, None]:
        left = end - start + min(self.delta, 0)
        async for chunk in super().get_range_stream(key, start, end, etag=etag):
            part = memoryview(chunk)[:left]
            left -= len(part)
            if part:
                yield part
        if self.delta > 0:
            yield b"x" * self.delta


@pytest.mark.parametrize("delta", [-CHUNK, 10])
async def test_a_page_of_the_wrong_length_is_stale_and_not_cached(
    env: Env, delta: int
) -> None:
    ufs = _WrongLength(env.ufs.inner)
    ufs.stream_chunks(CHUNK)
    ufs.delta = delta
    env.service._stores["/"] = ufs
    opened = await env.open()
    with pytest.raises(StaleVersion):
        await read_all(env, opened, PAGE - 100, PAGE)
    assert not env.pages.contains(env.page(opened, 0))
    assert ufs.calls["get_range_stream"] == 1


async def test_only_the_first_page_of_a_read_is_streamed(env: Env) -> None:
    opened = await env.open()
    assert await read_all(env, opened, 0, SIZE) == DATA
    assert env.service.stats.ufs_streamed == 1 and env.ufs.calls["get_range"] == 4
    for index in range(4):
        assert await env.cached_page(opened, index) == DATA[index * PAGE : (index + 1) * PAGE]


async def test_a_page_being_fetched_whole_is_not_fetched_again(env: Env) -> None:
    opened = await env.open()
    env.ufs.set_latency(0.1, ops={"get_range"})
    load = asyncio.ensure_future(env.service.load_range(opened, 0, PAGE))
    await asyncio.sleep(0.01)  # the load's whole-page read is under way
    assert await read_all(env, opened, 0, 4096) == DATA[:4096]
    await load
    assert env.ufs.calls["get_range"] == 1 and env.service.stats.ufs_streamed == 0


class _NoEtags(FaultInjectingUnderStore):
    """A store that reports no ETag: nothing pins what a stream would hand on."""

    async def head(self, key: str) -> ObjectInfo:
        return dataclasses.replace(await super().head(key), etag=None)


async def test_an_unpinned_version_is_not_streamed(env: Env) -> None:
    ufs = _NoEtags(env.ufs.inner)
    env.service._stores["/"] = ufs
    opened = await env.open()
    assert opened.status.etag is None
    assert await read_all(env, opened, 0, 4096) == DATA[:4096]
    assert env.service.stats.ufs_streamed == 0 and ufs.calls["get_range_stream"] == 0
    assert await env.cached_page(opened, 0) == DATA[:PAGE]


async def test_a_page_fetched_while_closing_is_stored_before_close_returns(env: Env) -> None:
    """``close`` waits for fetches in flight and for the stores of their pages they start;
    work spawned after it is dropped (a page not stored then is a later miss, nothing more)."""
    gate = env.ufs.hold_streams(after=CHUNK)
    opened = await env.open()
    chunks = reader(env, opened, 0, 4096)
    assert bytes(await asyncio.wait_for(anext(chunks), 5)) == DATA[:4096]
    closing = asyncio.ensure_future(env.service.close())
    await asyncio.sleep(0.05)
    assert not closing.done()  # the page's fetch is still in flight
    gate.set()
    await asyncio.wait_for(closing, 5)
    page = env.page(opened, 0)
    out = bytearray(PAGE)
    assert await env.pages.read_into(page, 0, memoryview(out)) and bytes(out) == DATA[:PAGE]
    assert not env.service._background
    env.service._spawn(env.service._store_page(env.page(opened, 1), b"x"))  # closed: dropped
    assert not env.service._background and not env.pages.contains(env.page(opened, 1))
