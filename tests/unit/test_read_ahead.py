"""The worker's read-ahead of sequential readers: it keeps ``prefetch_pages`` fetches in flight
(not pages ahead of the last request), goes at most twice that far ahead, stays inside the file
and the placement segment, and costs random readers and a closing worker nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

from depot.core.types import ByteRange, PageId
from depot.metastore.store import MetadataStore
from depot.namespace.mounts import Mount, MountTable
from depot.pagestore.memory import MemoryPageStore
from depot.ufs.base import Buffer
from depot.ufs.memory import MemoryBucket, MemoryUnderStore
from depot.worker.service import OpenedFile, ReadThroughService

PAGE = 4096
PAGES = 200
WINDOW = 4


class GatedStore(MemoryUnderStore):
    """An under store whose range reads wait until the test lets them go, and are counted."""

    def __init__(self, bucket: MemoryBucket) -> None:
        super().__init__(bucket)
        self.gate = asyncio.Event()
        self.inflight = 0
        self.peak = 0
        self.pages: list[int] = []

    async def get_range(self, key: str, start: int, end: int, *, etag: str | None = None) -> Buffer:
        self.pages.append(start // PAGE)
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            await self.gate.wait()
            return await super().get_range(key, start, end, etag=etag)
        finally:
            self.inflight -= 1


def _data() -> bytes:
    return b"".join(i.to_bytes(2, "big") * (PAGE // 2) for i in range(PAGES))


@asynccontextmanager
async def _service(
    tmp_path: Path, segment_size: int = 0
) -> AsyncIterator[tuple[ReadThroughService, GatedStore, OpenedFile]]:
    bucket = MemoryBucket()
    bucket.store("f.bin", _data())
    store = GatedStore(bucket)
    pages = MemoryPageStore(1 << 30, page_size=PAGE)
    meta = MetadataStore(tmp_path / "meta")
    service = ReadThroughService(
        MountTable([Mount("/", "memory://b")]), pages, meta, lambda m: store,
        prefetch_pages=WINDOW, segment_size=segment_size, read_window=1,
    )  # fmt: skip
    try:
        opened = await service.open("/f.bin")
        yield service, store, opened
    finally:
        store.gate.set()
        await service.close()
        meta.close()


async def _read(service: ReadThroughService, opened: OpenedFile, page: int) -> bytes:
    out = bytearray()
    async for chunk in service.read_chunks(
        opened, ByteRange(page * PAGE, (page + 1) * PAGE), bytearray(PAGE)
    ):
        out += chunk
    return bytes(out)


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def _cached(service: ReadThroughService, opened: OpenedFile) -> Iterator[int]:
    return (
        i for i in range(PAGES) if service.pages.contains(PageId(opened.file_id.key, i))
    )


def test_a_sequential_reader_keeps_the_window_of_fetches_in_flight(tmp_path: Path) -> None:
    async def go() -> None:
        async with _service(tmp_path) as (service, store, opened):
            store.gate.set()
            assert await _read(service, opened, 0) == _data()[:PAGE]
            store.gate.clear()
            reading = asyncio.ensure_future(_read(service, opened, 1))  # sequential: read-ahead
            await _settle()
            # The page asked for and WINDOW pages after it, no more.
            assert store.inflight == 1 + WINDOW
            assert sorted(store.pages[1:]) == list(range(1, 2 + WINDOW))
            store.gate.set()
            assert await reading == _data()[PAGE : 2 * PAGE]
            await _settle()
            # Each fetch that ended started the next, while the reader asked for nothing more,
            # up to twice the window past the page it asked for last.
            for _ in range(50):
                await asyncio.sleep(0.001)
            assert sorted(store.pages) == list(range(0, 2 + 2 * WINDOW))
            assert store.peak == 1 + WINDOW
            assert list(_cached(service, opened)) == list(range(0, 2 + 2 * WINDOW))

    asyncio.run(go())


def test_read_ahead_moves_on_with_the_reader_and_serves_the_right_bytes(tmp_path: Path) -> None:
    async def go() -> None:
        async with _service(tmp_path) as (service, store, opened):
            store.gate.set()
            data = _data()
            for page in range(PAGES):
                assert await _read(service, opened, page) == data[page * PAGE : (page + 1) * PAGE]
            await _settle()
            # Each page came from the store once, however many the read-ahead fetched early.
            assert sorted(store.pages) == list(range(PAGES))
            assert store.peak <= 1 + WINDOW

    asyncio.run(go())


def test_random_reads_fetch_only_what_they_ask_for(tmp_path: Path) -> None:
    async def go() -> None:
        async with _service(tmp_path) as (service, store, opened):
            store.gate.set()
            for page in (150, 3, 90, 40, 170, 120):
                await _read(service, opened, page)
            await _settle()
            assert store.pages == [150, 3, 90, 40, 170, 120]

    asyncio.run(go())


def test_read_ahead_ends_with_the_file(tmp_path: Path) -> None:
    async def go() -> None:
        async with _service(tmp_path) as (service, store, opened):
            store.gate.set()
            await _read(service, opened, PAGES - 3)
            await _read(service, opened, PAGES - 2)
            for _ in range(20):
                await asyncio.sleep(0.001)
            assert sorted(store.pages) == [PAGES - 3, PAGES - 2, PAGES - 1]

    asyncio.run(go())


def test_read_ahead_stays_inside_the_placement_segment(tmp_path: Path) -> None:
    async def go() -> None:
        async with _service(tmp_path, segment_size=6 * PAGE) as (service, store, opened):
            store.gate.set()
            await _read(service, opened, 0)
            await _read(service, opened, 1)
            for _ in range(20):
                await asyncio.sleep(0.001)
            assert sorted(store.pages) == list(range(6))  # pages 6 on belong to another worker

    asyncio.run(go())


def test_a_closing_worker_starts_no_more_read_ahead(tmp_path: Path) -> None:
    async def go() -> None:
        async with _service(tmp_path) as (service, store, opened):
            store.gate.set()
            await _read(service, opened, 0)
            store.gate.clear()
            reading = asyncio.ensure_future(_read(service, opened, 1))
            await _settle()
            assert store.inflight == 1 + WINDOW
            closing = asyncio.ensure_future(service.close())
            await _settle()
            store.gate.set()
            await reading
            await closing
            # Only the fetches already under way: none was started after the close began.
            assert sorted(store.pages) == list(range(0, 2 + WINDOW))

    asyncio.run(go())
