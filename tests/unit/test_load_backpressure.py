"""``load_range`` holds at most ``ufs_concurrency`` fetched pages before the page store has them,
and asks the page store to write its pages around the OS page cache (reads do not)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from depot.core.types import ByteRange, PageId
from depot.metastore.store import MetadataStore
from depot.namespace.mounts import Mount, MountTable
from depot.pagestore.base import Buffer
from depot.pagestore.memory import MemoryPageStore
from depot.ufs.memory import MemoryBucket, MemoryUnderStore
from depot.worker.service import ReadThroughService

PAGE = 4096


def _service(
    pages: MemoryPageStore, meta: MetadataStore, store: MemoryUnderStore, **settings: Any
) -> ReadThroughService:
    """A read-through service over one mount of ``store`` at ``/``."""
    return ReadThroughService(
        MountTable([Mount("/", "memory://b")]), pages, meta, lambda m: store, **settings
    )


class SlowPages(MemoryPageStore):
    """A page store that writes slowly and records how many pages the service held at once."""

    service: ReadThroughService
    peak = 0

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.hints: dict[PageId, bool] = {}

    async def put(self, page: PageId, data: Buffer, *, bypass_os_cache: bool = False) -> bool:
        self.peak = max(self.peak, len(self.service._filling))
        self.hints[page] = bypass_os_cache
        await asyncio.sleep(0.002)
        return await super().put(page, data)


def test_load_waits_for_the_page_store_instead_of_buffering(tmp_path: Path) -> None:
    async def go() -> None:
        bucket = MemoryBucket()
        bucket.store("f.bin", bytes(range(256)) * (PAGE * 40 // 256))
        store = MemoryUnderStore(bucket)
        pages = SlowPages(1 << 30, page_size=PAGE)
        meta = MetadataStore(tmp_path / "meta")
        service = _service(pages, meta, store, ufs_concurrency=3)
        pages.service = service
        try:
            opened = await service.open("/f.bin")
            result = await service.load_range(opened, 0, opened.status.size)
            assert result["loaded"] == result["cached"] == result["pages"] == 40
            assert 1 <= pages.peak <= 3
            for i in range(40):
                got = await pages.get(PageId(opened.file_id.key, i))
                assert got is not None
                assert bytes(got) == bucket.objects["f.bin"].data[i * PAGE : (i + 1) * PAGE]
        finally:
            await service.close()
            meta.close()

    asyncio.run(go())


def test_load_pages_bypass_the_os_cache_and_read_pages_do_not(tmp_path: Path) -> None:
    async def go(load_bypass: bool) -> tuple[dict[PageId, bool], str, str]:
        bucket = MemoryBucket()
        bucket.store("a.bin", bytes(PAGE * 4))
        bucket.store("b.bin", bytes(PAGE * 4))
        store = MemoryUnderStore(bucket)
        pages = SlowPages(1 << 30, page_size=PAGE)
        meta = MetadataStore(tmp_path / f"meta{load_bypass}")
        service = _service(pages, meta, store, prefetch_pages=0, load_bypass_os_cache=load_bypass)
        pages.service = service
        try:
            loaded = await service.open("/a.bin")
            await service.load_range(loaded, 0, loaded.status.size)
            read = await service.open("/b.bin")
            scratch = bytearray(PAGE)
            async for _chunk in service.read_chunks(read, ByteRange(0, read.status.size), scratch):
                pass
            await service.close()
            assert not service._loading
            return pages.hints, loaded.file_id.key, read.file_id.key
        finally:
            meta.close()

    hints, loaded, read = asyncio.run(go(True))
    assert {p: v for p, v in hints.items() if p.file_key == loaded} == {
        PageId(loaded, i): True for i in range(4)
    }
    assert {p: v for p, v in hints.items() if p.file_key == read} == {
        PageId(read, i): False for i in range(4)
    }
    hints, _, _ = asyncio.run(go(False))
    assert len(hints) == 8
    assert not any(hints.values())


class CountingPages(MemoryPageStore):
    """A page store that counts whole-page reads."""

    gets = 0

    async def get(self, page: PageId) -> bytes | None:
        self.gets += 1
        return await super().get(page)


class CountingStore(MemoryUnderStore):
    """An under store that counts range reads."""

    ranges = 0

    async def get_range(self, key: str, start: int, end: int, *, etag: str | None = None) -> Buffer:
        self.ranges += 1
        return await super().get_range(key, start, end, etag=etag)


def test_a_fill_for_a_reader_does_not_read_back_a_page_stored_meanwhile(tmp_path: Path) -> None:
    """A reader's fill (``load_range(..., for_reader=True)``) whose page was stored between its
    look and its fetch (by the read-ahead or another reader) neither reads the page back from the
    store nor fetches it again: the reader reads it from its file."""

    async def go() -> None:
        bucket = MemoryBucket()
        bucket.store("f.bin", bytes(range(256)) * (PAGE * 3 // 256) + b"tail")
        store = CountingStore(bucket)
        pages = CountingPages(1 << 30, page_size=PAGE)
        meta = MetadataStore(tmp_path / "meta")
        service = _service(pages, meta, store, prefetch_pages=0)
        try:
            opened = await service.open("/f.bin")
            await service.load_range(opened, 0, opened.status.size)
            assert store.ranges == 4
            assert [await service._fill_for_reader(opened, i) for i in range(4)] == [
                PAGE, PAGE, PAGE, 4
            ]
            assert pages.gets == 0
            assert store.ranges == 4
        finally:
            await service.close()
            meta.close()

    asyncio.run(go())
