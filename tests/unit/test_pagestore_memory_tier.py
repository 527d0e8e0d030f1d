"""LocalPageStore's memory tier: verified pages held in memory after a whole-page read that
is not the page's first use.

What must hold: the tier only ever serves the bytes of the page the store has now (a page
leaves it when its file is evicted, deleted, replaced or found damaged, and a late admission
of bytes read before a replace is refused), it stays within its size with the least recently
used pages leaving first, and a scrub (``check_stored``) still reads the file.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from depot.core.config import AUTO_MEMORY_MAX, CacheConfig, load_config, usable_memory
from depot.core.errors import ConfigError
from depot.core.types import PageId
from depot.pagestore import LocalPageStore, PageStore
from depot.testing.damage import flip_byte
from depot.testing.pagestore_contract import (
    PAGE,
    PageStoreContract,
    StoreFactory,
    capacity_for,
    payload,
    read_bytes,
)


@pytest.fixture
async def store_factory(tmp_path: Path) -> AsyncIterator[StoreFactory]:
    stores: list[PageStore] = []

    async def make(capacity: int, page_size: int) -> PageStore:
        store = await LocalPageStore.open(
            [(tmp_path / f"s{len(stores)}", capacity)], page_size, memory_bytes=2 * page_size
        )
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


class TestLocalWithMemoryTierContract(PageStoreContract):
    """The whole contract again, with a memory tier of two pages."""


def page(i: int, key: str = "f") -> PageId:
    return PageId(key, i)


async def open_store(root: Path, pages: int = 8, memory_pages: float = 2) -> LocalPageStore:
    return await LocalPageStore.open(
        [(root, capacity_for(pages))], PAGE, memory_bytes=int(memory_pages * PAGE)
    )


async def test_a_whole_page_read_is_held_and_answers_the_next_read(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        data = payload(PAGE, 1)
        assert await store.put(page(1), data)
        assert store.held(page(1)) is None  # a write does not fill the tier
        assert await read_bytes(store, page(1), 10, 100) == data[10:110]
        assert store.held(page(1)) is None  # nor does a part of a page
        assert await read_bytes(store, page(1), 0, PAGE) == data  # whole, after a first use
        held = store.held(page(1))
        assert held is not None and bytes(held) == data
        stats = store.stats()
        assert (stats.memory_pages, stats.memory_bytes) == (1, PAGE)
        assert stats.memory_capacity_bytes == 2 * PAGE
        # The file is damaged now: a read answered from memory never opens it.
        path = store.page_file(page(1))
        assert path is not None
        flip_byte(path, 5)
        hits = store.stats().memory_hits
        assert await read_bytes(store, page(1), 3, 1000) == data[3:1003]
        assert store.stats().memory_hits == hits + 1
        assert store.stats().corrupt_dropped == 0
        # A scrub reads the file: the damage is found and the page leaves both tiers.
        out = memoryview(bytearray(PAGE))
        assert not await store.read_into(page(1), 0, out, check_stored=True)
        assert not store.contains(page(1)) and store.held(page(1)) is None
        stats = store.stats()
        assert (stats.memory_pages, stats.memory_bytes, stats.corrupt_dropped) == (0, 0, 1)
    finally:
        await store.close()


async def test_a_page_used_more_often_pushes_out_the_least_recently_used(
    tmp_path: Path,
) -> None:
    store = await open_store(tmp_path, memory_pages=2.5)
    try:
        for i in range(4):
            assert await store.put(page(i), payload(PAGE, i))
        for i in (0, 1):
            await read_bytes(store, page(i), 0, PAGE)  # a first use is not held
            assert store.held(page(i)) is None
            await read_bytes(store, page(i), 0, PAGE)  # the second, with room: held
        assert store.touch(page(0))  # a use served elsewhere (a lane) counts too
        for _ in range(2):
            await read_bytes(store, page(2), 0, PAGE)
        # Full: page 2 (two uses) does not push out one used as often (page 1, the LRU).
        assert [i for i in range(4) if store.held(page(i)) is not None] == [0, 1]
        await read_bytes(store, page(2), 0, PAGE)  # its third use: more than page 1's two
        assert [i for i in range(4) if store.held(page(i)) is not None] == [0, 2]
        await read_bytes(store, page(0), 0, 10)  # answered from memory: a use
        for _ in range(4):
            await read_bytes(store, page(3), 0, PAGE)
        # Page 3 (four uses) pushed out page 2, the least recently used (three uses), not 0.
        assert [i for i in range(4) if store.held(page(i)) is not None] == [0, 3]
        assert store.stats().memory_bytes == 2 * PAGE <= 2.5 * PAGE
        assert store.stats().pages == 4  # the files stay
    finally:
        await store.close()


async def test_a_file_larger_than_the_tier_read_again_and_again_keeps_a_part_in_memory(
    tmp_path: Path,
) -> None:
    """Plain LRU would push out every page before its next use: no hits at all."""
    store = await open_store(tmp_path, pages=8, memory_pages=3)
    try:
        for i in range(8):
            assert await store.put(page(i), payload(PAGE, i))
        held_after: list[list[int]] = []
        hits = []
        for _ in range(5):
            for i in range(8):
                assert await read_bytes(store, page(i), 0, PAGE) == payload(PAGE, i)
            hits.append(store.stats().memory_hits)
            held_after.append([i for i in range(8) if store.held(page(i)) is not None])
        # The first pass is every page's first use: nothing is held until the second.
        assert held_after == [[]] + [[0, 1, 2]] * 4
        # Hits of the reads of a pass and of the looks after the pass before it (``held``
        # counts a hit too).
        assert [b - a for a, b in itertools.pairwise(hits)] == [0, 6, 6, 6]
    finally:
        await store.close()


async def test_pages_that_became_hot_replace_pages_no_longer_read(tmp_path: Path) -> None:
    store = await open_store(tmp_path, pages=8, memory_pages=2)
    try:
        for i in range(4):
            assert await store.put(page(i), payload(PAGE, i))
        for _ in range(20):  # the old working set, used often
            for i in (0, 1):
                await read_bytes(store, page(i), 0, PAGE)
        reads = 0
        while store.held(page(2)) is None or store.held(page(3)) is None:
            for i in (2, 3):  # the new one; the counts halve as uses go by
                await read_bytes(store, page(i), 0, PAGE)
            reads += 1
            assert reads < 200, "the new working set never got in"
        assert store.held(page(0)) is None and store.held(page(1)) is None
    finally:
        await store.close()


async def test_a_page_used_once_long_ago_is_held_on_its_next_read(tmp_path: Path) -> None:
    """Counts halve as uses go by, but a page used once stays known: a file read again after
    many other reads (a large dataset's next epoch) still goes into a tier with room."""
    store = await open_store(tmp_path, memory_pages=2)
    try:
        assert await store.put(page(1), payload(PAGE, 1))
        await read_bytes(store, page(1), 0, PAGE)  # its first use
        for i in range(1000):  # uses of other pages: several halvings of every count
            store.touch(page(i, "other"))
        assert store.held(page(1)) is None
        await read_bytes(store, page(1), 0, PAGE)
        assert store.held(page(1)) is not None
    finally:
        await store.close()


async def test_a_page_leaves_memory_with_its_file(tmp_path: Path) -> None:
    store = await open_store(tmp_path, pages=3, memory_pages=3)
    try:
        for i in range(3):
            assert await store.put(page(i), payload(PAGE, i))
            for _ in range(2):  # held on the second use
                await read_bytes(store, page(i), 0, PAGE)
        assert store.stats().memory_pages == 3
        assert await store.delete(page(0))
        assert store.held(page(0)) is None
        # Replaced: the next read must see the new bytes, never the held old ones.
        new = payload(PAGE, 99)
        assert await store.put(page(1), new)
        assert store.held(page(1)) is None
        assert await read_bytes(store, page(1), 0, PAGE) == new
        # Evicted to make room for other pages.
        assert await store.put(page(5), payload(PAGE, 5))
        assert await store.put(page(6), payload(PAGE, 6))
        assert not store.contains(page(2)) and store.held(page(2)) is None
        assert await store.delete_file("f") == 3
        stats = store.stats()
        assert (stats.memory_pages, stats.memory_bytes) == (0, 0)
    finally:
        await store.close()
    assert store.stats().memory_bytes == 0


async def test_a_late_admission_is_refused_once_the_page_changed(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        old = payload(PAGE, 1)
        assert await store.put(page(1), old)
        assert store.admission(page(1)) is None  # not used yet
        assert store.touch(page(1))
        admit = store.admission(page(1))
        assert admit is not None
        assert await store.put(page(1), payload(PAGE, 2))  # replaced meanwhile
        assert not admit(old)
        assert store.held(page(1)) is None
        assert await read_bytes(store, page(1), 0, PAGE) == payload(PAGE, 2)  # the new bytes'
        assert store.held(page(1)) is None  # first use: the replace started the count again
        assert await read_bytes(store, page(1), 0, PAGE) == payload(PAGE, 2)

        admit = store.admission(page(1))
        assert admit is None  # that read held the new bytes already
        assert await store.put(page(2), payload(PAGE, 3))
        assert store.touch(page(2))
        admit = store.admission(page(2))
        assert admit is not None
        assert not admit(payload(PAGE - 1, 3))  # not the page's length
        assert await store.delete(page(2))
        assert not admit(payload(PAGE, 3))  # removed meanwhile
        assert store.admission(page(2)) is None  # not stored

        assert await store.put(page(3), payload(PAGE, 4))
        assert store.touch(page(3))
        admit = store.admission(page(3))
        assert admit is not None and admit(payload(PAGE, 4))
        assert not admit(payload(PAGE, 4))  # held already
        assert store.stats().memory_pages == 2
    finally:
        await store.close()


async def test_held_is_answered_from_other_threads(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        data = payload(PAGE, 7)
        assert await store.put(page(7), data)
        for _ in range(2):  # held on the second use
            await read_bytes(store, page(7), 0, PAGE)
        found: list[bytes | None] = []

        def lane() -> None:
            for _ in range(100):
                held = store.held(page(7))
                found.append(None if held is None else bytes(held))

        threads = [threading.Thread(target=lane) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert found == [data] * 200
        assert store.stats().memory_hits == 200
    finally:
        await store.close()


async def test_no_memory_tier(tmp_path: Path) -> None:
    store = await open_store(tmp_path, memory_pages=0)
    try:
        assert await store.put(page(1), payload(PAGE, 1))
        assert await read_bytes(store, page(1), 0, PAGE) == payload(PAGE, 1)
        assert store.held(page(1)) is None and store.admission(page(1)) is None
        stats = store.stats()
        assert (stats.memory_pages, stats.memory_capacity_bytes, stats.memory_hits) == (0, 0, 0)
    finally:
        await store.close()


async def test_a_page_larger_than_the_tier_is_not_held(tmp_path: Path) -> None:
    store = await open_store(tmp_path, memory_pages=0.5)
    try:
        assert await store.put(page(1), payload(PAGE, 1))
        assert await store.put(page(2), payload(PAGE // 4, 2))
        for _ in range(2):  # a first use is never held
            await read_bytes(store, page(1), 0, PAGE)
            await read_bytes(store, page(2), 0, PAGE // 4)
        assert store.admission(page(1)) is None
        assert store.held(page(1)) is None and store.held(page(2)) is not None
    finally:
        await store.close()


def test_memory_size_setting() -> None:
    assert CacheConfig().memory_size == "auto"
    assert CacheConfig().memory_capacity == min(AUTO_MEMORY_MAX, usable_memory() // 8)
    assert CacheConfig(memory_size="512MiB").memory_capacity == 512 * 1024**2
    assert CacheConfig(memory_size=" AUTO ").memory_size == "auto"
    assert CacheConfig(memory_size=0).memory_capacity == 0
    config = load_config(environ={"DEPOT_CACHE__MEMORY_SIZE": "64MiB"})
    assert config.cache.memory_capacity == 64 * 1024**2
    for bad in ("-1", "lots", "1.5.2GiB", -4):
        with pytest.raises(ConfigError, match="memory_size"):
            load_config(environ={}, overrides={"cache": {"memory_size": bad}})


def test_usable_memory_is_positive() -> None:
    assert usable_memory() > 0


async def test_from_config_sizes_the_tier(tmp_path: Path) -> None:
    cache = CacheConfig(dirs=[{"path": tmp_path, "size": "8MiB"}], memory_size="3MiB")
    store = await LocalPageStore.open_from_config(cache)
    try:
        assert store.stats().memory_capacity_bytes == 3 * 1024**2
    finally:
        await store.close()
