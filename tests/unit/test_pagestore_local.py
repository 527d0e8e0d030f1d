"""LocalPageStore: the contract, plus what only a disk store has to get right.

Corruption and truncation on disk, garbage in the cache dir, restart, the dir lock, concurrent
writers under a tight quota, several dirs with their own sizes, LFU, the thread fallback of
reads, cancellation and write errors.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from depot.core.config import CacheConfig
from depot.core.directio import takes_direct_io
from depot.core.errors import ConfigError, InvalidArgument, Unavailable
from depot.core.types import FileId, PageId
from depot.pagestore import BLOCK_SIZE, LocalPageStore, PageStore
from depot.pagestore import format as fmt
from depot.pagestore import local as local_mod
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
        store = await LocalPageStore.open([(tmp_path / f"s{len(stores)}", capacity)], page_size)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


class TestLocalContract(PageStoreContract):
    pass


def disk_bytes(root: Path) -> int:
    """Bytes of all page files (temp files included) under a cache dir.

    Counted per inode, so a file renamed while the walk runs is not counted twice.
    """
    sizes: dict[int, int] = {}
    for dirpath, _dirs, files in os.walk(root / "pages"):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue  # unlinked or renamed meanwhile
            sizes[st.st_ino] = st.st_size
    return sum(sizes.values())


def page_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "pages").rglob("*") if p.is_file())


async def open_store(root: Path, capacity: int = capacity_for(4), **kw: object) -> LocalPageStore:
    return await LocalPageStore.open([(root, capacity)], PAGE, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ corruption


B = BLOCK_SIZE


@pytest.mark.parametrize(
    ("position", "offset", "length"),
    [
        (0, 0, PAGE),  # every block read straight into the caller's buffer
        (B + 17, B, B),  # one whole block, straight
        (B + 17, B + 1, 10),  # inside one block, through scratch
        (PAGE - 1, 2 * B + 5, 2 * B - 5),  # partial first block, whole last block
        (5, 0, B + 10),  # whole first block, partial last block
        (B + 3, 10, 2 * B),  # partial first, whole middle, partial last
        (2 * B + 1, B - 1, B + 2),  # the corrupt byte is in the partial last block
    ],
)
async def test_flipped_data_byte_is_never_served(
    tmp_path: Path, position: int, offset: int, length: int
) -> None:
    store = await open_store(tmp_path)
    page = PageId("f", 0)
    data = payload(PAGE, 1)
    assert await store.put(page, data)
    assert await store.get(page) == data  # checksums now cached in memory
    path = store.page_file(page)
    assert path is not None
    flip_byte(path, position)
    assert await read_bytes(store, page, offset, length) is None
    assert not store.contains(page)
    stats = store.stats()
    assert (stats.corrupt_dropped, stats.pages) == (1, 0)
    await store.drain()
    assert not path.exists()
    assert store.stats().used_bytes == 0
    assert await store.put(page, data)
    assert await store.get(page) == data
    await store.close()


async def test_flipped_byte_in_a_one_block_page(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    page = PageId("f", 0)
    assert await store.put(page, payload(1000, 2))
    path = store.page_file(page)
    assert path is not None
    flip_byte(path, 999)
    assert await store.get(page) is None
    assert store.stats().corrupt_dropped == 1
    await store.close()


async def test_flip_outside_the_read_blocks_still_serves_the_range(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    page = PageId("f", 0)
    data = payload(PAGE, 2)
    assert await store.put(page, data)
    path = store.page_file(page)
    assert path is not None
    flip_byte(path, 3 * BLOCK_SIZE + 5)
    # Blocks 0 and 1 are intact: a read of them is verified and served.
    assert await read_bytes(store, page, 10, BLOCK_SIZE) == data[10 : 10 + BLOCK_SIZE]
    assert await read_bytes(store, page, 3 * BLOCK_SIZE, 10) is None
    assert store.stats().corrupt_dropped == 1
    await store.close()


async def test_damaged_trailer_drops_page_on_first_read(tmp_path: Path) -> None:
    root = tmp_path / "c"
    store = await open_store(root)
    page = PageId("f", 0)
    assert await store.put(page, payload(PAGE, 3))
    path = store.page_file(page)
    assert path is not None
    await store.close()
    # No checksum cache: the trailer is read, and checked, on the first read.
    store = await open_store(root, checksum_cache_bytes=0)
    assert store.contains(page)
    flip_byte(path, PAGE + 3)  # inside the checksum table
    assert await read_bytes(store, page, 0, 100) is None
    assert store.stats().corrupt_dropped == 1
    await store.close()


async def test_truncated_file(tmp_path: Path) -> None:
    root = tmp_path / "c"
    store = await open_store(root, checksum_cache_bytes=0)
    page, other = PageId("f", 0), PageId("f", 1)
    assert await store.put(page, payload(PAGE, 4))
    assert await store.put(other, payload(PAGE, 5))
    path = store.page_file(page)
    assert path is not None
    os.truncate(path, PAGE // 2)
    assert await read_bytes(store, page, 0, 10) is None
    assert store.stats().corrupt_dropped == 1
    other_path = store.page_file(other)
    assert other_path is not None
    await store.close()
    os.truncate(other_path, PAGE + 5)
    store = await open_store(root)
    assert not store.contains(other)
    stats = store.stats()
    assert (stats.pages, stats.used_bytes, stats.corrupt_dropped) == (0, 0, 1)
    assert page_files(root) == []
    await store.close()


async def test_vanished_file_is_a_miss(tmp_path: Path) -> None:
    store = await open_store(tmp_path, fd_cache=0)
    page = PageId("f", 0)
    assert await store.put(page, payload(100, 6))
    path = store.page_file(page)
    assert path is not None
    path.unlink()
    assert await store.get(page) is None
    assert not store.contains(page)
    await store.drain()
    assert store.stats().used_bytes == 0
    await store.close()


# ------------------------------------------------------------------ recovery


async def test_restart_keeps_pages_and_usage(tmp_path: Path) -> None:
    root = tmp_path / "c"
    key = FileId("s3://bucket/model.safetensors", "e:abc").key
    odd = "weird key/with ü and .."
    store = await open_store(root)
    written = {
        PageId(key, 0): payload(PAGE, 7),
        PageId(key, 1): payload(1000, 8),
        PageId(odd, 2): payload(BLOCK_SIZE, 9),
    }
    for page, data in written.items():
        assert await store.put(page, data)
    used = store.stats().used_bytes
    await store.close()
    store = await open_store(root)
    stats = store.stats()
    assert (stats.pages, stats.used_bytes, stats.corrupt_dropped) == (3, used, 0)
    assert store.file_pages(key) == [0, 1]
    assert store.file_pages(odd) == [2]
    for page, data in written.items():
        assert await store.get(page) == data
        assert await read_bytes(store, page, 1, 10) == data[1:11]
    assert used == disk_bytes(root)
    await store.close()


async def test_recovery_removes_garbage_and_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "c"
    store = await open_store(root)
    page = PageId("f", 0)
    assert await store.put(page, payload(PAGE, 10))
    path = store.page_file(page)
    assert path is not None
    await store.close()
    pages = root / "pages"
    garbage = [
        path.parent / f".1.{os.getpid()}.7.tmp",  # an interrupted write
        path.parent / "2",  # a page name with no valid footer
        path.parent / "notanumber",
        path.parent / "007",  # not a canonical index
        pages / "zz" / "junk",  # not a shard
        pages / "stray",
        pages / fmt.shard_of("g") / "bad name!" / "0",  # not a file key we would write
        pages / "00" / "f" / "0",  # right name, wrong shard
    ]
    for g in garbage:
        g.parent.mkdir(parents=True, exist_ok=True)
        g.write_bytes(os.urandom(300))
    (pages / "emptydir").mkdir()
    store = await open_store(root)
    assert page_files(root) == [path]
    assert not (pages / "emptydir").exists()
    stats = store.stats()
    assert stats.pages == 1
    assert stats.corrupt_dropped == 1  # "2" looked like a page and was not
    assert await store.get(page) == payload(PAGE, 10)
    await store.close()


async def test_restart_trims_to_a_smaller_size_oldest_first(tmp_path: Path) -> None:
    root = tmp_path / "c"
    store = await open_store(root, capacity_for(4))
    for i in range(4):
        assert await store.put(PageId("f", i), payload(PAGE, i))
    paths = [store.page_file(PageId("f", i)) for i in range(4)]
    await store.close()
    # Page 2 was used most recently, page 0 next; pages 3 and 1 are the oldest.
    for age, i in enumerate([2, 0, 1, 3]):
        p = paths[i]
        assert p is not None
        os.utime(p, (1_000_000 - age * 1000, 1_000_000 - age * 1000))
    store = await open_store(root, capacity_for(2))
    assert store.file_pages("f") == [0, 2]
    stats = store.stats()
    assert (stats.evictions, stats.used_bytes) == (2, disk_bytes(root))
    assert await store.put(PageId("f", 5), payload(PAGE, 5))
    assert store.file_pages("f") == [2, 5]  # page 0 is the older of the two kept
    await store.close()


async def test_page_size_change_discards_pages(tmp_path: Path) -> None:
    root = tmp_path / "c"
    store = await open_store(root)
    assert await store.put(PageId("f", 0), payload(PAGE, 11))
    await store.close()
    store = await LocalPageStore.open([(root, capacity_for(4))], PAGE // 2)
    assert store.stats().pages == 0
    assert page_files(root) == []
    assert await store.put(PageId("f", 0), payload(PAGE // 2, 12))
    await store.close()


async def test_dir_is_locked_while_open(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    with pytest.raises(ConfigError):
        await open_store(tmp_path)
    await store.close()
    again = await open_store(tmp_path)
    await again.close()


async def test_use_before_start_and_after_close(tmp_path: Path) -> None:
    store = LocalPageStore([(tmp_path, capacity_for(4))], PAGE)
    with pytest.raises(Unavailable):
        await store.put(PageId("f", 0), b"x")
    assert not await store.read_into(PageId("f", 0), 0, memoryview(bytearray(1)))
    async with store:
        assert await store.put(PageId("f", 0), b"x")
    with pytest.raises(Unavailable):
        await store.put(PageId("f", 0), b"x")
    assert await store.get(PageId("f", 0)) is None


async def test_from_config(tmp_path: Path) -> None:
    cache = CacheConfig.model_validate(
        {
            "dirs": [
                {"path": tmp_path / "a", "size": 1 << 20},
                {"path": tmp_path / "b", "size": "2MiB"},
            ],
            "page_size": "64KiB",
            "eviction": "lfu",
        }
    )
    store = LocalPageStore.from_config(cache)
    assert (store.page_size, store.eviction, store.capacity) == (65536, "lfu", 3 << 20)
    await store.start()
    assert await store.put(PageId("f", 0), b"hello")
    await store.close()
    store = await LocalPageStore.open_from_config(cache)
    assert await store.get(PageId("f", 0)) == b"hello"
    await store.close()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        LocalPageStore([], PAGE)
    with pytest.raises(InvalidArgument):
        LocalPageStore([(tmp_path, 0)], PAGE)
    with pytest.raises(InvalidArgument):
        LocalPageStore([(tmp_path, 10), (tmp_path, 10)], PAGE)
    with pytest.raises(InvalidArgument):
        LocalPageStore([(tmp_path, 10)], PAGE, eviction="random")


# ------------------------------------------------------------------ quota and placement


class DiskMeter:
    """Counts page-file bytes on disk from inside the store's I/O threads.

    A write counts its whole file before its first byte is written and an unlink uncounts a
    file after it is gone, so ``peak`` bounds what was ever on disk at one moment. (Walking the
    dirs from the test instead would add up files seen at different moments.)
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, start: int = 0) -> None:
        self.lock = threading.Lock()
        self.now = self.peak = start
        real_write, real_unlink = local_mod._write_page, local_mod._unlink_all

        def unlink_all(paths: list[str], rmdirs: list[str]) -> None:
            for path in paths:
                try:
                    size = os.lstat(path).st_size
                except FileNotFoundError:
                    continue
                real_unlink([path], [])
                with self.lock:
                    self.now -= size
            real_unlink([], rmdirs)

        def write_page(
            unlink: list[str],
            rmdirs: list[str],
            page: PageId,
            data: memoryview,
            tmp: str,
            path: str,
            direct: object = None,
        ) -> object:
            unlink_all(unlink, rmdirs)
            with self.lock:
                self.now += fmt.file_size(len(data))
                self.peak = max(self.peak, self.now)
            return real_write([], [], page, data, tmp, path, direct)

        monkeypatch.setattr(local_mod, "_unlink_all", unlink_all)
        monkeypatch.setattr(local_mod, "_write_page", write_page)


async def test_concurrent_puts_keep_disk_within_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    capacity = capacity_for(5)
    store = await open_store(tmp_path, capacity)
    meter = DiskMeter(monkeypatch)
    peak_used = 0
    done = False

    async def watch() -> None:
        nonlocal peak_used
        while not done:
            peak_used = max(peak_used, store.stats().used_bytes)
            await asyncio.sleep(0)

    watcher = asyncio.ensure_future(watch())
    pages = [PageId(f"f{i % 7}", i) for i in range(60)]
    results = await asyncio.gather(*(store.put(p, payload(PAGE, i)) for i, p in enumerate(pages)))
    done = True
    await watcher
    await store.drain()
    assert all(results)
    assert peak_used <= capacity
    assert meter.peak <= capacity
    assert meter.peak > 4 * PAGE  # the meter saw the writes
    stats = store.stats()
    assert stats.pages == 5
    assert stats.evictions == 55
    assert stats.used_bytes == disk_bytes(tmp_path) == meter.now
    assert len(page_files(tmp_path)) == 5
    await store.close()


async def test_multiple_dirs_each_keep_their_size(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    dirs = [(a, capacity_for(3)), (b, capacity_for(1))]
    store = await LocalPageStore.open(dirs, PAGE)
    written: dict[PageId, bytes] = {}
    for i in range(20):
        page = PageId(f"m{i % 3}", i)
        written[page] = payload(PAGE - i * 100, i)
        assert await store.put(page, written[page])
        for d, (root, size) in zip(store.dir_stats(), dirs, strict=True):
            assert d.path == root
            assert d.used_bytes <= size
    await store.drain()
    by_dir = {d.path: d for d in store.dir_stats()}
    assert by_dir[a].pages == 3
    assert by_dir[b].pages == 1
    assert disk_bytes(a) == by_dir[a].used_bytes
    assert disk_bytes(b) == by_dir[b].used_bytes
    kept = {PageId(k, i) for k in ("m0", "m1", "m2") for i in store.file_pages(k)}
    await store.close()
    store = await LocalPageStore.open(dirs, PAGE)
    assert {PageId(k, i) for k in ("m0", "m1", "m2") for i in store.file_pages(k)} == kept
    for page in kept:
        assert await store.get(page) == written[page]
    await store.close()


async def test_lfu_keeps_a_hot_page_then_ages_it_out(tmp_path: Path) -> None:
    store = await open_store(tmp_path, capacity_for(3), eviction="lfu")
    hot = PageId("hot", 0)
    assert await store.put(hot, payload(PAGE, 0))
    for _ in range(4):
        assert await read_bytes(store, hot, 0, 10) is not None
    survived = 0
    for i in range(1, 40):
        assert await store.put(PageId("cold", i), payload(PAGE, i))
        if not store.contains(hot):
            break
        survived += 1
    # LRU would have dropped it on the third put; LFU keeps it a while, aging lets it go.
    assert 3 <= survived < 39
    await store.close()


# ------------------------------------------------------------------ read paths


async def test_read_falls_back_to_a_thread_when_not_cached(tmp_path: Path) -> None:
    store = await open_store(tmp_path, checksum_cache_bytes=0)
    page = PageId("f", 0)
    data = payload(PAGE, 13)
    assert await store.put(page, data)
    path = store.page_file(page)
    assert path is not None
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    before = store.thread_reads
    assert await read_bytes(store, page, 5, 3 * BLOCK_SIZE) == data[5 : 5 + 3 * BLOCK_SIZE]
    assert store.thread_reads == before + 1
    inline = store.inline_reads
    assert await read_bytes(store, page, 5, 3 * BLOCK_SIZE) == data[5 : 5 + 3 * BLOCK_SIZE]
    assert store.inline_reads == inline + 1
    await store.close()


async def test_reads_racing_evictions_never_see_wrong_bytes(tmp_path: Path) -> None:
    # inline_read_max=0 sends every read to a thread, so evictions land while reads are in flight
    store = await open_store(tmp_path, capacity_for(2), inline_read_max=0, fd_cache=2)
    data = {i: payload(PAGE, 300 + i) for i in range(12)}

    async def reader(i: int) -> None:
        for _ in range(4):
            got = await read_bytes(store, PageId("r", i), 100, PAGE - 200)
            assert got is None or got == data[i][100 : PAGE - 100]
            await asyncio.sleep(0)

    async def writer(i: int) -> None:
        assert await store.put(PageId("r", i), data[i])

    jobs = [writer(i) for i in range(12)] + [reader(i) for i in range(12)]
    await asyncio.gather(*jobs)
    await store.drain()
    assert store.stats().used_bytes == disk_bytes(tmp_path) <= capacity_for(2)
    assert store.stats().corrupt_dropped == 0
    await store.close()


async def test_delete_during_a_threaded_read(tmp_path: Path) -> None:
    store = await open_store(tmp_path, inline_read_max=0)
    page = PageId("f", 0)
    data = payload(PAGE, 14)
    assert await store.put(page, data)
    buf = bytearray(PAGE)
    ok, deleted = await asyncio.gather(
        store.read_into(page, 0, memoryview(buf)), store.delete(page)
    )
    assert ok and deleted
    assert buf == data
    assert not store.contains(page)
    await store.close()


# ------------------------------------------------------------------ failures


async def test_cancelled_put_leaves_no_orphans(tmp_path: Path) -> None:
    store = await open_store(tmp_path, capacity_for(3))
    tasks = [asyncio.ensure_future(store.put(PageId("c", i), payload(PAGE, i))) for i in range(8)]
    await asyncio.sleep(0)
    for t in tasks[::2]:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await store.drain()
    stats = store.stats()
    assert stats.used_bytes == disk_bytes(tmp_path) <= capacity_for(3)
    assert len(page_files(tmp_path)) == stats.pages
    for i in store.file_pages("c"):
        assert await store.get(PageId("c", i)) == payload(PAGE, i)
    await store.close()


async def test_write_error_releases_the_reservation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store(tmp_path)
    assert await store.put(PageId("f", 0), payload(PAGE, 15))
    used = store.stats().used_bytes

    def no_space(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(local_mod, "_write_page", no_space)
    assert not await store.put(PageId("f", 1), payload(PAGE, 16))
    stats = store.stats()
    assert (stats.write_errors, stats.used_bytes, stats.pages) == (1, used, 1)
    monkeypatch.undo()
    assert await store.put(PageId("f", 1), payload(PAGE, 16))
    await store.close()


async def test_close_waits_for_writes_in_flight(tmp_path: Path) -> None:
    root = tmp_path / "c"
    store = await open_store(root, capacity_for(2))
    tasks = [asyncio.ensure_future(store.put(PageId("w", i), payload(PAGE, i))) for i in range(6)]
    await asyncio.sleep(0)
    await store.close()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(r is True or isinstance(r, Unavailable) for r in results)
    assert disk_bytes(root) <= capacity_for(2)
    assert not list(root.rglob("*.tmp"))
    store = await open_store(root, capacity_for(2))
    for i in store.file_pages("w"):
        assert await store.get(PageId("w", i)) == payload(PAGE, i)
    await store.close()


async def test_media_error_drops_the_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await open_store(tmp_path)
    page = PageId("f", 0)
    assert await store.put(page, payload(PAGE, 17))

    def eio(*_args: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(local_mod, "_read_blocks", eio)
    assert await read_bytes(store, page, 0, 10) is None
    assert not store.contains(page)
    assert store.stats().corrupt_dropped == 1
    await store.close()


async def test_file_shrunk_under_cached_checksums(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    page = PageId("f", 0)
    data = payload(PAGE, 18)
    assert await store.put(page, data)
    assert await store.get(page) == data
    path = store.page_file(page)
    assert path is not None
    os.truncate(path, 2 * BLOCK_SIZE)
    assert await read_bytes(store, page, 0, 10) == data[:10]  # block 0 is still there
    assert await read_bytes(store, page, 3 * BLOCK_SIZE, 10) is None
    assert store.stats().corrupt_dropped == 1
    await store.close()


async def test_same_page_in_two_dirs_keeps_the_newer(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    dirs = [(a, capacity_for(2)), (b, capacity_for(2))]
    store = await LocalPageStore.open(dirs, PAGE)
    page = PageId("f", 0)
    assert await store.put(page, payload(PAGE, 19))
    path = store.page_file(page)
    assert path is not None
    await store.close()
    other_root = b if path.is_relative_to(a) else a
    copy = other_root / path.relative_to(path.parents[3])
    copy.parent.mkdir(parents=True)
    copy.write_bytes(path.read_bytes())
    os.utime(path, (1_000_000, 1_000_000))  # the original is now the older one
    store = await LocalPageStore.open(dirs, PAGE)
    assert store.page_file(page) == copy
    assert store.stats().pages == 1
    await store.drain()
    assert not path.exists()
    assert store.stats().used_bytes == disk_bytes(a) + disk_bytes(b)
    assert await store.get(page) == payload(PAGE, 19)
    await store.close()


async def test_buffers_of_other_formats(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    words = memoryview(bytearray(payload(4096, 20))).cast("I")
    assert await store.put(PageId("f", 0), words)
    out = bytearray(4096)
    assert await store.read_into(PageId("f", 0), 0, memoryview(out).cast("Q"))
    assert out == payload(4096, 20)
    await store.close()


async def test_cancelled_threaded_read_finishes_before_returning(tmp_path: Path) -> None:
    store = await open_store(tmp_path, inline_read_max=0)
    page = PageId("f", 0)
    data = payload(PAGE, 21)
    assert await store.put(page, data)
    buf = bytearray(PAGE)
    task = asyncio.ensure_future(store.read_into(page, 0, memoryview(buf)))
    await asyncio.sleep(0)  # the read is now in a pool thread
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The thread was done with the caller's buffer before the cancellation got through.
    assert buf == data
    assert await store.get(page) == data
    await store.close()


# ------------------------------------------------------------------ direct writes (preloads)


def resident_pages(path: Path) -> int:
    """Pages of ``path`` held in the OS page cache (``mincore`` of a private mapping)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        count = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * count)()
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
        try:
            if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return sum(v & 1 for v in vec)
        finally:
            del address


async def test_bypass_os_cache_writes_around_the_page_cache(tmp_path: Path) -> None:
    if not takes_direct_io(tmp_path):
        pytest.skip("the test dir's filesystem has no O_DIRECT")
    store = await open_store(tmp_path / "c")
    length = PAGE - 100  # an unaligned tail goes through the page cache with the trailer
    data = payload(length, 7)
    assert await store.put(PageId("f", 0), data, bypass_os_cache=True)
    aligned = length - length % 4096
    assert store.stats().direct_bytes == aligned
    path = Path(store.page_file(PageId("f", 0)) or "")
    # At most the pages of the tail and the trailer are cached (none of the direct part).
    assert resident_pages(path) <= 2
    assert await store.get(PageId("f", 0)) == data
    assert await store.put(PageId("f", 1), data)  # without the hint: through the page cache
    assert store.stats().direct_bytes == aligned
    assert resident_pages(Path(store.page_file(PageId("f", 1)) or "")) >= aligned // 4096
    await store.close()


async def test_bypass_os_cache_falls_back_where_o_direct_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem without O_DIRECT (tmpfs, some network ones) gets the page the usual way,
    once asked: the dir is remembered as one that takes no direct writes."""
    store = await open_store(tmp_path / "c")
    real_open = os.open
    direct_opens = []

    def refusing_open(path: str, flags: int, *args: int, **kw: object) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            direct_opens.append(path)
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refusing_open)
    for index in range(3):
        data = payload(PAGE, 20 + index)
        assert await store.put(PageId("f", index), data, bypass_os_cache=True)
        assert await store.get(PageId("f", index)) == data
    monkeypatch.undo()
    assert len(direct_opens) == (1 if hasattr(os, "O_DIRECT") else 0)
    stats = store.stats()
    assert (stats.direct_bytes, stats.write_errors, stats.pages) == (0, 0, 3)
    assert not list((tmp_path / "c").rglob("*.tmp"))
    await store.close()


async def test_direct_write_error_leaves_no_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device error of a direct write fails the put (counted), leaves no temp file and keeps
    the page that was there."""
    if not takes_direct_io(tmp_path):
        pytest.skip("the test dir's filesystem has no O_DIRECT")
    store = await open_store(tmp_path / "c")
    old = payload(PAGE, 30)
    assert await store.put(PageId("f", 0), old)

    def failing_pwrite(*_args: object) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "pwrite", failing_pwrite)
    assert not await store.put(PageId("f", 0), payload(PAGE, 31), bypass_os_cache=True)
    monkeypatch.undo()
    assert store.stats().write_errors == 1
    assert not list((tmp_path / "c").rglob("*.tmp"))
    assert not store.contains(PageId("f", 0)) or await store.get(PageId("f", 0)) == old
    await store.close()


async def test_direct_writes_of_pages_larger_than_the_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages larger than a thread's direct buffer are written through it a piece at a time."""
    if not takes_direct_io(tmp_path):
        pytest.skip("the test dir's filesystem has no O_DIRECT")
    monkeypatch.setattr(local_mod, "DIRECT_BUFFER", 3 * 4096)
    store = await open_store(tmp_path / "c")
    for index, length in enumerate([PAGE, PAGE - 5000, 3 * 4096 + 1, 7 * 4096]):
        data = payload(length, 60 + index)
        assert await store.put(PageId("big", index), data, bypass_os_cache=True)
        assert await store.get(PageId("big", index)) == data
    assert store.stats().direct_bytes == sum(
        n - n % 4096 for n in [PAGE, PAGE - 5000, 3 * 4096 + 1, 7 * 4096]
    )
    await store.close()
