"""The contract every ``PageStore`` keeps, as tests each backend's test module reuses.

Two parts:

- ``PageStoreContract``: subclass it in a test module (as ``TestXxxContract``) and provide a
  ``store_factory`` fixture: ``await store_factory(capacity_bytes, page_size)`` returns a started
  store (the fixture closes what it made). Tests use pages of several 64 KiB blocks so partial,
  unaligned and block-crossing reads are all exercised.
- ``PageStoreMachine``: a Hypothesis state machine that holds a store against a dict model.
  Subclass it, implement ``open_store`` (and ``reopen``/``corrupt`` where the backend can), and
  expose ``MyMachine.TestCase``. It checks, after every step, that the store holds exactly the
  model's pages, that every read returns the model's bytes, that only evictions make pages
  disappear (in LRU order while that order is known), and that usage never exceeds the quota.

Quota accounting may include per-page overhead (the disk store counts its trailers), so the
contract only assumes ``sum(lengths) <= used_bytes <= capacity_bytes`` and leaves a slack of an
eighth of a page when it sizes a store for an exact number of pages.
"""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from depot.core.errors import InvalidArgument, InvalidRange
from depot.core.types import PageId
from depot.pagestore.base import PageStore

StoreFactory = Callable[[int, int], Awaitable[PageStore]]

BLOCK = 64 * 1024
PAGE = 4 * BLOCK
SLACK = PAGE // 8

T = TypeVar("T")


def payload(length: int, seed: int) -> bytes:
    """Deterministic bytes that differ for every seed (so a mixed-up page shows)."""
    return random.Random(seed).randbytes(length)


def capacity_for(pages: int, page_size: int = PAGE) -> int:
    """A capacity that holds exactly ``pages`` full pages of ``page_size``."""
    return pages * page_size + page_size // 8


async def read_bytes(store: PageStore, page: PageId, offset: int, length: int) -> bytes | None:
    buf = bytearray(length)
    if not await store.read_into(page, offset, memoryview(buf)):
        return None
    return bytes(buf)


def stored_pages(store: PageStore, keys: list[str]) -> set[PageId]:
    return {PageId(k, i) for k in keys for i in store.file_pages(k)}


class PageStoreContract:
    """Behaviour every page store shares. Needs a ``store_factory`` fixture."""

    async def test_roundtrip_full_page(self, store_factory: StoreFactory) -> None:
        store = await store_factory(capacity_for(4), PAGE)
        data = payload(PAGE, 1)
        page = PageId("f", 0)
        assert await store.put(page, data)
        assert store.page_length(page) == PAGE
        assert store.contains(page)
        assert await store.get(page) == data
        assert await read_bytes(store, page, 0, PAGE) == data

    async def test_partial_reads(self, store_factory: StoreFactory) -> None:
        store = await store_factory(capacity_for(4), PAGE)
        data = payload(PAGE, 2)
        page = PageId("f", 3)
        assert await store.put(page, data)
        cases = [
            (0, 1),
            (0, 4096),
            (1, 4095),
            (100, 70_000),
            (BLOCK, BLOCK),
            (BLOCK, 2 * BLOCK),
            (BLOCK - 1, 2),
            (BLOCK - 10, BLOCK + 20),
            (BLOCK + 5, 2 * BLOCK - 5),
            (0, PAGE - 1),
            (1, PAGE - 1),
            (PAGE - 1, 1),
            (PAGE - 4096, 4096),
            (3, 3 * BLOCK),
            (2 * BLOCK, BLOCK - 7),
        ]
        for offset, length in cases:
            assert (
                await read_bytes(store, page, offset, length) == data[offset : offset + length]
            ), (
                offset,
                length,
            )

    async def test_short_last_page(self, store_factory: StoreFactory) -> None:
        store = await store_factory(capacity_for(4), PAGE)
        length = 2 * BLOCK + 12_345
        data = payload(length, 3)
        page = PageId("f", 9)
        assert await store.put(page, data)
        assert store.page_length(page) == length
        assert await store.get(page) == data
        for offset, n in [
            (length - 1, 1),
            (2 * BLOCK, 12_345),
            (2 * BLOCK - 3, 12_348),
            (BLOCK + 1, length - BLOCK - 1),
            (0, length),
        ]:
            assert await read_bytes(store, page, offset, n) == data[offset : offset + n]
        assert await read_bytes(store, page, length, 0) == b""

    async def test_tiny_page(self, store_factory: StoreFactory) -> None:
        store = await store_factory(capacity_for(4), PAGE)
        page = PageId("f", 0)
        assert await store.put(page, b"x")
        assert await store.get(page) == b"x"
        assert await store.put(PageId("f", 1), b"")
        assert store.page_length(PageId("f", 1)) == 0
        assert await store.get(PageId("f", 1)) == b""

    async def test_bypass_os_cache_keeps_the_bytes(self, store_factory: StoreFactory) -> None:
        """The hint changes how a page is written, never what is read back (aligned or not)."""
        store = await store_factory(capacity_for(8), PAGE)
        lengths = [PAGE, PAGE - 1, 2 * BLOCK + 12_345, 8192, 4095, 100, 0]
        for index, length in enumerate(lengths):
            data = payload(length, 40 + index)
            page = PageId("direct", index)
            assert await store.put(page, data, bypass_os_cache=True)
            assert store.page_length(page) == length
            assert await store.get(page) == data
            if length > 8:
                assert await read_bytes(store, page, length - 7, 7) == data[-7:]
        page = PageId("direct", 0)
        plain = payload(PAGE, 50)
        assert await store.put(page, plain)  # replaced without the hint, then with it again
        assert await store.get(page) == plain
        again = payload(PAGE - 4096, 51)
        assert await store.put(page, again, bypass_os_cache=True)
        assert await store.get(page) == again

    async def test_miss(self, store_factory: StoreFactory) -> None:
        store = await store_factory(capacity_for(4), PAGE)
        page = PageId("nothing", 0)
        assert store.page_length(page) is None
        assert not store.contains(page)
        assert await store.get(page) is None
        assert not await store.read_into(page, 0, memoryview(bytearray(10)))
        assert store.file_pages("nothing") == []

    async def test_read_past_end_raises(self, store_factory: StoreFactory) -> None:
        store = await store_factory(capacity_for(4), PAGE)
        page = PageId("f", 0)
        assert await store.put(page, payload(1000, 4))
        for offset, n in [(0, 1001), (1000, 1), (999, 2), (-1, 1), (5000, 0)]:
            try:
                await store.read_into(page, offset, memoryview(bytearray(n)))
            except InvalidRange:
                continue
            raise AssertionError(f"read of [{offset}, {offset + n}) did not raise")
        assert await store.get(page) == payload(1000, 4)

    async def test_put_larger_than_page_size_raises(self, store_factory: StoreFactory) -> None:
        store = await store_factory(capacity_for(4), PAGE)
        try:
            await store.put(PageId("f", 0), bytes(PAGE + 1))
        except InvalidArgument:
            pass
        else:
            raise AssertionError("a page over page_size was accepted")
        assert store.stats().pages == 0
        assert store.stats().used_bytes == 0

    async def test_accepts_any_buffer(self, store_factory: StoreFactory) -> None:
        store = await store_factory(capacity_for(4), PAGE)
        data = payload(BLOCK + 3, 5)
        assert await store.put(PageId("f", 0), bytearray(data))
        assert await store.put(PageId("f", 1), memoryview(data)[1:])
        assert await store.get(PageId("f", 0)) == data
        assert await store.get(PageId("f", 1)) == data[1:]

    async def test_overwrite(self, store_factory: StoreFactory) -> None:
        store = await store_factory(capacity_for(4), PAGE)
        page = PageId("f", 0)
        assert await store.put(page, payload(PAGE, 6))
        assert await store.put(page, payload(BLOCK + 1, 7))
        assert store.page_length(page) == BLOCK + 1
        assert await store.get(page) == payload(BLOCK + 1, 7)
        stats = store.stats()
        assert stats.pages == 1
        assert BLOCK + 1 <= stats.used_bytes < PAGE
        assert stats.evictions == 0

    async def test_delete(self, store_factory: StoreFactory) -> None:
        store = await store_factory(capacity_for(4), PAGE)
        page = PageId("f", 0)
        other = PageId("f", 1)
        assert await store.put(page, payload(PAGE, 8))
        assert await store.put(other, payload(100, 9))
        assert await store.delete(page)
        assert not await store.delete(page)
        assert not store.contains(page)
        assert await store.get(page) is None
        assert await store.get(other) == payload(100, 9)
        assert store.file_pages("f") == [1]
        assert await store.delete(other)
        stats = store.stats()
        assert (stats.pages, stats.used_bytes, stats.evictions) == (0, 0, 0)

    async def test_delete_file(self, store_factory: StoreFactory) -> None:
        store = await store_factory(capacity_for(8), PAGE)
        for i in range(3):
            assert await store.put(PageId("f", i), payload(BLOCK, i))
        assert await store.put(PageId("g", 0), payload(BLOCK, 10))
        assert store.file_pages("f") == [0, 1, 2]
        assert await store.delete_file("f") == 3
        assert await store.delete_file("f") == 0
        assert store.file_pages("f") == []
        assert all(not store.contains(PageId("f", i)) for i in range(3))
        assert await store.get(PageId("g", 0)) == payload(BLOCK, 10)
        assert store.stats().pages == 1
        assert await store.put(PageId("f", 1), payload(10, 11))
        assert await store.get(PageId("f", 1)) == payload(10, 11)

    async def test_quota_never_exceeded(self, store_factory: StoreFactory) -> None:
        capacity = capacity_for(4)
        store = await store_factory(capacity, PAGE)
        written: dict[PageId, bytes] = {}
        for i in range(12 * 3 // 2):  # 3x the capacity in pages of 1 to 4 blocks
            data = payload(BLOCK * (1 + i % 4) - i, 100 + i)
            page = PageId(f"file{i % 3}", i)
            assert await store.put(page, data)
            written[page] = data
            stats = store.stats()
            assert stats.used_bytes <= capacity
            assert stats.capacity_bytes == capacity
        stats = store.stats()
        assert stats.evictions > 0
        assert stats.evicted_bytes > 0
        present = stored_pages(store, ["file0", "file1", "file2"])
        assert len(present) == stats.pages
        for page in present:
            assert await store.get(page) == written[page]
        assert sum(len(written[p]) for p in present) <= stats.used_bytes <= capacity

    async def test_lru_evicts_least_recently_read(self, store_factory: StoreFactory) -> None:
        store = await store_factory(capacity_for(3), PAGE)
        a, b, c, d = (PageId("f", i) for i in range(4))
        for p in (a, b, c):
            assert await store.put(p, payload(PAGE, p.index))
        assert await read_bytes(store, a, 10, 10) is not None
        assert await store.put(d, payload(PAGE, 3))
        assert not store.contains(b)
        assert all(store.contains(p) for p in (a, c, d))
        assert store.stats().evictions == 1
        assert await read_bytes(store, c, 0, 1) is not None
        assert await store.put(b, payload(PAGE, 1))
        assert not store.contains(a)
        assert store.file_pages("f") == [1, 2, 3]

    async def test_oversize_rejected(self, store_factory: StoreFactory) -> None:
        store = await store_factory(PAGE // 2, PAGE)
        assert not await store.put(PageId("f", 0), payload(PAGE, 12))
        stats = store.stats()
        assert (stats.rejected, stats.pages, stats.used_bytes) == (1, 0, 0)
        assert await store.put(PageId("f", 1), payload(PAGE // 4, 13))
        assert await store.get(PageId("f", 1)) == payload(PAGE // 4, 13)
        assert store.stats().rejected == 1

    async def test_stats_consistent(self, store_factory: StoreFactory) -> None:
        capacity = capacity_for(5)
        store = await store_factory(capacity, PAGE)
        sizes = {PageId("f", 0): PAGE, PageId("f", 1): 1, PageId("g", 0): BLOCK + 7}
        for i, (page, size) in enumerate(sizes.items()):
            assert await store.put(page, payload(size, i))
        stats = store.stats()
        assert stats.pages == 3
        assert stats.capacity_bytes == capacity
        assert sum(sizes.values()) <= stats.used_bytes <= capacity
        used_before = stats.used_bytes
        assert await store.delete(PageId("f", 1))
        stats = store.stats()
        assert stats.pages == 2
        assert stats.used_bytes < used_before
        assert (stats.evictions, stats.evicted_bytes, stats.corrupt_dropped, stats.rejected) == (
            0,
            0,
            0,
            0,
        )

    async def test_concurrent_puts_keep_quota(self, store_factory: StoreFactory) -> None:
        capacity = capacity_for(4)
        store = await store_factory(capacity, PAGE)
        peak = 0
        done = False

        async def watch() -> None:
            nonlocal peak
            while not done:
                peak = max(peak, store.stats().used_bytes)
                await asyncio.sleep(0)

        watcher = asyncio.ensure_future(watch())
        pages = [PageId(f"c{i % 5}", i) for i in range(24)]
        results = await asyncio.gather(
            *(store.put(p, payload(PAGE - i, 200 + i)) for i, p in enumerate(pages))
        )
        done = True
        await watcher
        assert all(results)
        assert peak <= capacity
        stats = store.stats()
        assert stats.used_bytes <= capacity
        assert stats.evictions == len(pages) - stats.pages
        present = stored_pages(store, [f"c{i}" for i in range(5)])
        assert len(present) == stats.pages >= 1
        for page in present:
            assert await store.get(page) == payload(PAGE - page.index, 200 + page.index)

    async def test_concurrent_reads_and_writes(self, store_factory: StoreFactory) -> None:
        store = await store_factory(capacity_for(3), PAGE)
        pages = [PageId("r", i) for i in range(6)]

        async def reader(page: PageId) -> None:
            for _ in range(5):
                got = await read_bytes(store, page, 0, BLOCK + 1)
                assert got is None or got == payload(PAGE, page.index)[: BLOCK + 1]
                await asyncio.sleep(0)

        async def writer(page: PageId) -> None:
            assert await store.put(page, payload(PAGE, page.index))

        await asyncio.gather(*(writer(p) for p in pages), *(reader(p) for p in pages))
        assert store.stats().used_bytes <= capacity_for(3)


class PageStoreMachine(RuleBasedStateMachine):
    """Drive a store with random operations and hold it against a dict model.

    Subclasses implement ``open_store``; ``reopen`` (restart over the same storage) and
    ``corrupt`` (damage one stored page) enable the matching rules.
    """

    page_size = 3 * BLOCK
    capacity = 5 * 3 * BLOCK + 3 * BLOCK // 8
    keys = ["a", "b", "c"]
    checks_lru_order = True

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.model: dict[PageId, bytes] = {}
        # Recency order of the model pages, oldest first, while it is known exactly.
        self.order: OrderedDict[PageId, None] | None = (
            OrderedDict() if self.checks_lru_order else None
        )
        self.store = self.run(self.open_store())

    # -- hooks

    async def open_store(self) -> PageStore:
        raise NotImplementedError

    async def reopen(self, store: PageStore) -> PageStore | None:
        """Close ``store`` and open it again on the same storage; None if not supported."""
        return None

    async def corrupt(self, store: PageStore, page: PageId, position: int) -> bool:
        """Damage the byte at ``position`` of ``page``; False if not supported."""
        return False

    def cleanup(self) -> None:
        """Release what ``open_store`` made (after the store is closed)."""

    # -- plumbing

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.run(self.store.close())
        finally:
            self.loop.close()
            self.cleanup()

    def used(self, page: PageId) -> None:
        if self.order is not None:
            self.order[page] = None
            self.order.move_to_end(page)

    def forget(self, page: PageId) -> None:
        self.model.pop(page, None)
        if self.order is not None:
            self.order.pop(page, None)

    def reconcile(self, evictions_before: int, keep: set[PageId]) -> None:
        """Pages the store no longer has must be exactly the ones it says it evicted."""
        evicted = self.store.stats().evictions - evictions_before
        gone = [p for p in self.model if not self.store.contains(p)]
        assert not keep.intersection(gone), "a page just written is missing"
        assert len(gone) == evicted, f"{len(gone)} pages vanished, {evicted} evictions"
        if self.order is not None and gone:
            oldest = [p for p in self.order if p not in keep][: len(gone)]
            assert set(oldest) == set(gone), "eviction did not take the least recently used"
        for p in gone:
            self.forget(p)

    pages = st.builds(PageId, st.sampled_from(keys), st.integers(0, 4))
    lengths = st.one_of(
        st.sampled_from([3 * BLOCK, BLOCK, 2 * BLOCK + 1, 1, 0]), st.integers(0, 3 * BLOCK)
    )

    # -- rules

    @rule(page=pages, length=lengths, seed=st.integers(0, 2**16), direct=st.booleans())
    def put(self, page: PageId, length: int, seed: int, direct: bool) -> None:
        before = self.store.stats().evictions
        data = payload(length, seed)
        assert self.run(self.store.put(page, data, bypass_os_cache=direct))
        self.model[page] = data
        self.used(page)
        self.reconcile(before, {page})

    @rule(
        batch=st.lists(
            st.tuples(pages, lengths, st.integers(0, 2**16)),
            min_size=2,
            max_size=8,
            unique_by=lambda t: t[0],
        )
    )
    def put_concurrently(self, batch: list[tuple[PageId, int, int]]) -> None:
        before = self.store.stats().evictions
        peak = 0

        async def go() -> list[bool]:
            nonlocal peak
            tasks = [asyncio.ensure_future(self.store.put(p, payload(n, s))) for p, n, s in batch]
            while not all(t.done() for t in tasks):
                peak = max(peak, self.store.stats().used_bytes)
                await asyncio.sleep(0)
            return [t.result() for t in tasks]

        assert all(self.run(go()))
        assert peak <= self.capacity
        # A page of the batch that was already stored may be evicted and then written again.
        rewritten = sum(1 for p, _n, _s in batch if p in self.model)
        for p, n, s in batch:
            self.model[p] = payload(n, s)
        self.order = None  # the interleaving decides the recency order
        evicted = self.store.stats().evictions - before
        gone = [p for p in self.model if not self.store.contains(p)]
        assert len(gone) <= evicted <= len(gone) + rewritten
        for p in gone:
            self.forget(p)

    @rule(page=pages, start=st.floats(0, 1), size=st.floats(0, 1))
    def read(self, page: PageId, start: float, size: float) -> None:
        data = self.model.get(page)
        if data is None:
            assert self.run(read_bytes(self.store, page, 0, 0)) is None
            return
        offset = int(start * len(data))
        length = int(size * (len(data) - offset))
        assert (
            self.run(read_bytes(self.store, page, offset, length)) == data[offset : offset + length]
        )
        self.used(page)

    @rule(page=pages, extra=st.integers(1, BLOCK))
    def read_past_end(self, page: PageId, extra: int) -> None:
        data = self.model.get(page)
        if data is None:
            return
        offset = max(0, len(data) - extra // 2)
        try:
            self.run(read_bytes(self.store, page, offset, extra))
        except InvalidRange:
            return
        raise AssertionError("a read past the end of a page did not raise")

    @rule(page=pages)
    def delete(self, page: PageId) -> None:
        assert self.run(self.store.delete(page)) == (page in self.model)
        self.forget(page)

    @rule(key=st.sampled_from(keys))
    def delete_file(self, key: str) -> None:
        expected = [p for p in self.model if p.file_key == key]
        assert self.run(self.store.delete_file(key)) == len(expected)
        for p in expected:
            self.forget(p)

    @rule()
    def restart(self) -> None:
        store = self.run(self.reopen(self.store))
        if store is None:
            return
        self.store = store
        self.order = None  # rebuilt from file times, which are coarser than the model
        assert self.store.stats().evictions == 0

    # Which pages survive depends on eviction order, which after a restart comes from file times:
    # so the draws here have a fixed shape and are mapped onto the model, never shaped by it
    # (Hypothesis must be able to replay them).
    @rule(choice=st.integers(0, 1 << 16), offset=st.integers(0, 1 << 24))
    def corrupt_page(self, choice: int, offset: int) -> None:
        if not self.model:
            return
        stored = sorted(self.model, key=str)
        page = stored[choice % len(stored)]
        content = self.model[page]
        if not content:
            return
        position = offset % len(content)
        before = self.store.stats().corrupt_dropped
        if not self.run(self.corrupt(self.store, page, position)):
            return
        assert self.run(read_bytes(self.store, page, 0, len(content))) is None
        assert not self.store.contains(page)
        assert self.store.stats().corrupt_dropped == before + 1
        self.forget(page)

    # -- invariants

    @invariant()
    def holds_exactly_the_model(self) -> None:
        assert stored_pages(self.store, self.keys) == set(self.model)
        stats = self.store.stats()
        assert stats.pages == len(self.model)
        assert sum(len(v) for v in self.model.values()) <= stats.used_bytes <= self.capacity
        for page, content in self.model.items():
            assert self.store.page_length(page) == len(content)
