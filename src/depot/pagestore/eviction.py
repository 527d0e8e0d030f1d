"""Eviction orders for page stores: LRU, and LFU with dynamic aging.

A policy only orders pages; the store decides when to evict and calls ``remove(page, evicted=True)``
for each victim. Every operation is O(1) (LRU) or O(log n) amortized (LFU).
"""

from __future__ import annotations

import abc
import heapq
import itertools
from collections import OrderedDict

from depot.core.errors import InvalidArgument
from depot.core.types import PageId


class EvictionPolicy(abc.ABC):
    """The order in which pages leave a full store."""

    name: str

    @abc.abstractmethod
    def add(self, page: PageId) -> None:
        """A page was stored (it counts as just used)."""

    @abc.abstractmethod
    def touch(self, page: PageId) -> None:
        """A page was read."""

    @abc.abstractmethod
    def remove(self, page: PageId, evicted: bool = False) -> None:
        """A page left the store; ``evicted`` when it was chosen by ``victim``."""

    @abc.abstractmethod
    def victim(self) -> PageId | None:
        """The page to evict next (without removing it), or None when empty."""

    @abc.abstractmethod
    def __len__(self) -> int: ...


class LruPolicy(EvictionPolicy):
    """Least recently used first."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[PageId, None] = OrderedDict()

    def add(self, page: PageId) -> None:
        self._order[page] = None
        self._order.move_to_end(page)

    def touch(self, page: PageId) -> None:
        if page in self._order:
            self._order.move_to_end(page)

    def remove(self, page: PageId, evicted: bool = False) -> None:
        self._order.pop(page, None)

    def victim(self) -> PageId | None:
        return next(iter(self._order), None)

    def __len__(self) -> int:
        return len(self._order)


class LfuPolicy(EvictionPolicy):
    """Least frequently used first, with dynamic aging (LFU-DA).

    A page's priority is ``age + hits`` where ``age`` is the priority of the last evicted page at
    the time of its last access. Plain LFU keeps a page that was hot once forever; with aging the
    floor rises as pages are evicted, so new pages eventually outrank an old hot page that is no
    longer read. Ties go to the least recently used page. The heap is lazy: stale entries are
    skipped on pop and the heap is rebuilt when it holds too many of them.
    """

    name = "lfu"

    def __init__(self) -> None:
        self._age = 0
        self._seq = itertools.count()
        # page -> (hits, priority, seq of its live heap entry)
        self._meta: dict[PageId, tuple[int, int, int]] = {}
        self._heap: list[tuple[int, int, PageId]] = []

    def _push(self, page: PageId, hits: int) -> None:
        priority = self._age + hits
        seq = next(self._seq)
        self._meta[page] = (hits, priority, seq)
        heapq.heappush(self._heap, (priority, seq, page))
        if len(self._heap) > 2 * len(self._meta) + 64:
            self._heap = [(p, s, pg) for pg, (_h, p, s) in self._meta.items()]
            heapq.heapify(self._heap)

    def add(self, page: PageId) -> None:
        self._push(page, 1)

    def touch(self, page: PageId) -> None:
        meta = self._meta.get(page)
        if meta is not None:
            self._push(page, meta[0] + 1)

    def remove(self, page: PageId, evicted: bool = False) -> None:
        meta = self._meta.pop(page, None)
        if meta is not None and evicted:
            self._age = max(self._age, meta[1])

    def victim(self) -> PageId | None:
        heap = self._heap
        while heap:
            _priority, seq, page = heap[0]
            meta = self._meta.get(page)
            if meta is not None and meta[2] == seq:
                return page
            heapq.heappop(heap)
        return None

    def hits(self, page: PageId) -> int:
        """How often ``page`` was used since it was stored (0 if absent)."""
        meta = self._meta.get(page)
        return 0 if meta is None else meta[0]

    def __len__(self) -> int:
        return len(self._meta)


def make_policy(name: str) -> EvictionPolicy:
    if name == "lru":
        return LruPolicy()
    if name == "lfu":
        return LfuPolicy()
    raise InvalidArgument(f"unknown eviction policy {name!r} (use 'lru' or 'lfu')")
