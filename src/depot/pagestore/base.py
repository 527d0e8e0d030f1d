"""The page-store interface: fixed-size pages of file versions on local disks.

A page is identified by ``PageId(file_key, index)``; ``file_key`` already includes the file's
version, so pages of two versions never mix. Every byte returned has passed its checksum; a page
that fails is dropped and reported as a miss. Implementations run ``depot.testing.pagestore_contract``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from depot.core.types import PageId

Buffer = bytes | bytearray | memoryview


@dataclass(slots=True)
class PageStoreStats:
    pages: int = 0
    used_bytes: int = 0
    capacity_bytes: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    corrupt_dropped: int = 0
    rejected: int = 0
    write_errors: int = 0
    # Bytes of pages written without filling the OS page cache (``bypass_os_cache``).
    direct_bytes: int = 0
    # The memory tier: verified pages held in memory, and the reads it answered.
    memory_pages: int = 0
    memory_bytes: int = 0
    memory_capacity_bytes: int = 0
    memory_hits: int = 0


class PageStore(abc.ABC):
    """Fixed-size pages on local storage with a quota, eviction and verified reads."""

    page_size: int

    @abc.abstractmethod
    async def read_into(
        self, page: PageId, offset: int, out: memoryview, *, check_stored: bool = False
    ) -> bool:
        """Fill ``out`` with ``len(out)`` bytes of ``page`` starting at ``offset``.

        Returns False on a miss (absent, or present but corrupt, in which case it is dropped).
        Raises ``InvalidRange`` if the request runs past the page's length. ``check_stored``
        reads (and checks) the stored copy even where the page is held in memory: a scrub.
        """

    def held(self, page: PageId) -> Buffer | None:
        """The verified bytes of ``page`` if this store holds them in memory, else None.

        Safe from any thread. The bytes are never changed; the caller sends or copies them
        and calls ``touch`` (on the loop) to count the use.
        """
        return None

    def admission(self, page: PageId) -> Callable[[Buffer], bool] | None:
        """Where a store has a memory tier and ``page`` is stored but not held: a callable
        that holds bytes the caller has just read whole from the stored copy (and checked).
        Ask from any thread; call it on the event loop. It refuses bytes if the page was
        replaced or removed since this call. None when there is nothing to admit."""
        return None

    async def get(self, page: PageId) -> bytes | None:
        """The whole page, or None on a miss."""
        size = self.page_length(page)
        if size is None:
            return None
        buf = bytearray(size)
        if not await self.read_into(page, 0, memoryview(buf)):
            return None
        return bytes(buf)

    @abc.abstractmethod
    async def put(self, page: PageId, data: Buffer, *, bypass_os_cache: bool = False) -> bool:
        """Store ``data`` (at most ``page_size`` bytes) as ``page``, atomically.

        Evicts other pages to stay within the quota. Returns False if the page cannot be
        admitted (larger than the quota). Replaces an existing page with the same id.
        ``bypass_os_cache`` is a hint for pages nobody reads soon (a preload): write them to
        the disk without filling the operating system's page cache, where a store can.
        """

    @abc.abstractmethod
    def page_length(self, page: PageId) -> int | None:
        """Length of the stored page, or None if absent. Cheap: no disk access."""

    def contains(self, page: PageId) -> bool:
        return self.page_length(page) is not None

    def touch(self, page: PageId) -> bool:
        """Count a use of ``page`` served without this store (a short-circuit read by a local
        client, a miss served as fetched) towards its eviction order and its place in a memory
        tier; True if the page is stored."""
        return self.contains(page)

    @abc.abstractmethod
    def file_pages(self, file_key: str) -> list[int]:
        """Sorted indexes of the stored pages of one file version. Cheap: no disk access."""

    @abc.abstractmethod
    async def delete(self, page: PageId) -> bool:
        """Remove one page; True if it was there."""

    @abc.abstractmethod
    async def delete_file(self, file_key: str) -> int:
        """Remove every page of one file version; returns how many were removed."""

    @abc.abstractmethod
    def stats(self) -> PageStoreStats:
        """Counters and usage."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Get ready to serve (a disk store recovers its index here). Idempotent."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release resources."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
