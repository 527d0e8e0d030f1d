"""MemoryPageStore: the contract, plus its test hook and argument checks."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from depot.core.errors import InvalidArgument
from depot.core.types import PageId
from depot.pagestore import MemoryPageStore, PageStore
from depot.testing.pagestore_contract import PageStoreContract, StoreFactory


@pytest.fixture
async def store_factory() -> AsyncIterator[StoreFactory]:
    stores: list[PageStore] = []

    async def make(capacity: int, page_size: int) -> PageStore:
        store = MemoryPageStore(capacity, page_size)
        await store.start()
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


class TestMemoryContract(PageStoreContract):
    pass


async def test_corrupt_hook_drops_page() -> None:
    store = MemoryPageStore(1 << 20, 4096)
    page = PageId("f", 0)
    assert not store.corrupt(page)
    assert await store.put(page, b"abc")
    assert store.corrupt(page)
    assert store.contains(page)
    assert await store.get(page) is None
    assert not store.contains(page)
    assert store.stats().corrupt_dropped == 1
    assert await store.put(page, b"abc")
    assert await store.get(page) == b"abc"


async def test_lfu_keeps_the_page_read_often() -> None:
    store = MemoryPageStore(3 * 100, 100, eviction="lfu")
    assert store.eviction == "lfu"
    for i in range(3):
        assert await store.put(PageId("f", i), bytes(100))
    for _ in range(3):
        assert await store.get(PageId("f", 0)) is not None
    assert await store.get(PageId("f", 2)) is not None
    assert await store.put(PageId("f", 3), bytes(100))
    assert store.file_pages("f") == [0, 2, 3]


@pytest.mark.parametrize(
    ("capacity", "page_size", "eviction"), [(0, 10, "lru"), (10, 0, "lru"), (10, 10, "fifo")]
)
def test_bad_arguments(capacity: int, page_size: int, eviction: str) -> None:
    with pytest.raises(InvalidArgument):
        MemoryPageStore(capacity, page_size, eviction)


async def test_negative_index_rejected() -> None:
    async with MemoryPageStore(1000, 100) as store:
        with pytest.raises(InvalidArgument):
            await store.put(PageId("f", -1), b"x")
