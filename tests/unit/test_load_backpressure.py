"""``load_range`` holds at most ``ufs_concurrency`` fetched pages before the page store has them."""

from __future__ import annotations

import asyncio
from pathlib import Path

from depot.core.types import PageId
from depot.metastore.store import MetadataStore
from depot.namespace.mounts import Mount, MountTable
from depot.pagestore.base import Buffer
from depot.pagestore.memory import MemoryPageStore
from depot.ufs.memory import MemoryBucket, MemoryUnderStore
from depot.worker.service import ReadThroughService

PAGE = 4096


class SlowPages(MemoryPageStore):
    """A page store that writes slowly and records how many pages the service held at once."""

    service: ReadThroughService
    peak = 0

    async def put(self, page: PageId, data: Buffer) -> bool:
        self.peak = max(self.peak, len(self.service._filling))
        await asyncio.sleep(0.002)
        return await super().put(page, data)


def test_load_waits_for_the_page_store_instead_of_buffering(tmp_path: Path) -> None:
    async def go() -> None:
        bucket = MemoryBucket()
        bucket.store("f.bin", bytes(range(256)) * (PAGE * 40 // 256))
        store = MemoryUnderStore(bucket)
        pages = SlowPages(1 << 30, page_size=PAGE)
        meta = MetadataStore(tmp_path / "meta")
        service = ReadThroughService(
            MountTable([Mount("/", "memory://b")]), pages, meta, lambda m: store,
            ufs_concurrency=3,
        )
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
