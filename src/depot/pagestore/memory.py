"""A page store in a dict, for unit tests of the layers above the page store.

It keeps the same quota, eviction and miss semantics as the disk store (and passes the same
contract suite), so a test written against it holds for the real store. ``corrupt`` lets a test
make the next read of a page fail its check, the way a damaged page file would.
"""

from __future__ import annotations

from depot.core.config import DEFAULT_PAGE_SIZE
from depot.core.errors import InvalidArgument, InvalidRange
from depot.core.types import PageId
from depot.pagestore.base import Buffer, PageStore, PageStoreStats
from depot.pagestore.eviction import make_policy


class MemoryPageStore(PageStore):
    """Pages in memory with a byte quota (counted in data bytes) and LRU or LFU eviction."""

    def __init__(
        self, capacity: int, page_size: int = DEFAULT_PAGE_SIZE, eviction: str = "lru"
    ) -> None:
        if page_size <= 0:
            raise InvalidArgument(f"page size must be positive, not {page_size}")
        if capacity <= 0:
            raise InvalidArgument(f"capacity must be positive, not {capacity}")
        self.page_size = page_size
        self.capacity = capacity
        self._policy = make_policy(eviction)
        self._pages: dict[PageId, bytes] = {}
        self._by_file: dict[str, set[int]] = {}
        self._corrupt: set[PageId] = set()
        self._used = 0
        self._stats = PageStoreStats(capacity_bytes=capacity)

    @property
    def eviction(self) -> str:
        return self._policy.name

    async def read_into(
        self, page: PageId, offset: int, out: memoryview, *, check_stored: bool = False
    ) -> bool:
        data = self._pages.get(page)
        if data is None:
            return False
        end = offset + len(out)
        if offset < 0 or end > len(data):
            raise InvalidRange(f"bytes [{offset}, {end}) outside page of {len(data)}", str(page))
        if page in self._corrupt:
            self._remove(page)
            self._stats.corrupt_dropped += 1
            return False
        out[:] = data[offset:end]
        self._policy.touch(page)
        return True

    def touch(self, page: PageId) -> bool:
        if page not in self._pages:
            return False
        self._policy.touch(page)
        return True

    async def put(self, page: PageId, data: Buffer, *, bypass_os_cache: bool = False) -> bool:
        size = len(data)
        if size > self.page_size:
            raise InvalidArgument(f"page of {size} bytes exceeds the page size {self.page_size}")
        if page.index < 0:
            raise InvalidArgument(f"negative page index {page.index}")
        if size > self.capacity:
            self._stats.rejected += 1
            return False
        self._remove(page)
        while self._used + size > self.capacity:
            victim = self._policy.victim()
            if victim is None:  # pragma: no cover - size <= capacity guarantees a victim
                raise AssertionError("usage above quota with nothing to evict")
            self._stats.evictions += 1
            self._stats.evicted_bytes += len(self._pages[victim])
            self._remove(victim, evicted=True)
        self._pages[page] = bytes(data)
        self._by_file.setdefault(page.file_key, set()).add(page.index)
        self._used += size
        self._policy.add(page)
        return True

    def page_length(self, page: PageId) -> int | None:
        data = self._pages.get(page)
        return None if data is None else len(data)

    def file_pages(self, file_key: str) -> list[int]:
        return sorted(self._by_file.get(file_key, ()))

    async def delete(self, page: PageId) -> bool:
        return self._remove(page)

    async def delete_file(self, file_key: str) -> int:
        indexes = list(self._by_file.get(file_key, ()))
        for index in indexes:
            self._remove(PageId(file_key, index))
        return len(indexes)

    def corrupt(self, page: PageId) -> bool:
        """Make the next read of ``page`` fail verification (a test hook); True if present."""
        if page not in self._pages:
            return False
        self._corrupt.add(page)
        return True

    def stats(self) -> PageStoreStats:
        s = self._stats
        return PageStoreStats(
            pages=len(self._pages),
            used_bytes=self._used,
            capacity_bytes=self.capacity,
            evictions=s.evictions,
            evicted_bytes=s.evicted_bytes,
            corrupt_dropped=s.corrupt_dropped,
            rejected=s.rejected,
        )

    def _remove(self, page: PageId, evicted: bool = False) -> bool:
        data = self._pages.pop(page, None)
        if data is None:
            return False
        self._used -= len(data)
        self._corrupt.discard(page)
        self._policy.remove(page, evicted=evicted)
        indexes = self._by_file.get(page.file_key)
        if indexes is not None:
            indexes.discard(page.index)
            if not indexes:
                del self._by_file[page.file_key]
        return True
