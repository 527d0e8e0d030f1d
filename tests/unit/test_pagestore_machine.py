"""Both page stores held against a dict model by a Hypothesis state machine.

The disk store also restarts (close, reopen over the same dirs) and has page files damaged; with
a memory tier, it also takes late admissions (a lane's) of bytes that may be stale by then.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

from depot.core.types import PageId
from depot.pagestore import LocalPageStore, MemoryPageStore, PageStore
from depot.testing.damage import flip_byte
from depot.testing.pagestore_contract import PageStoreMachine

SETTINGS = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class MemoryMachine(PageStoreMachine):
    async def open_store(self) -> PageStore:
        return MemoryPageStore(self.capacity, self.page_size)

    async def corrupt(self, store: PageStore, page: PageId, position: int) -> bool:
        assert isinstance(store, MemoryPageStore)
        return store.corrupt(page)


class LocalMachine(PageStoreMachine):
    eviction = "lru"

    async def open_store(self) -> PageStore:
        self.root = Path(tempfile.mkdtemp(prefix="depot-machine-"))
        return await self._open()

    async def _open(self) -> LocalPageStore:
        # A small fd cache and checksum budget so that both get turned over.
        return await LocalPageStore.open(
            [(self.root, self.capacity)],
            self.page_size,
            self.eviction,
            fd_cache=2,
            checksum_cache_bytes=64,
        )

    async def reopen(self, store: PageStore) -> PageStore | None:
        await store.close()
        return await self._open()

    async def corrupt(self, store: PageStore, page: PageId, position: int) -> bool:
        assert isinstance(store, LocalPageStore)
        path = store.page_file(page)
        assert path is not None
        flip_byte(path, position)
        return True

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class LocalLfuMachine(LocalMachine):
    eviction = "lfu"
    checks_lru_order = False


class TwoDirMachine(LocalMachine):
    """Two dirs of different sizes: pages spread over both and each keeps its own size."""

    capacity = 3 * PageStoreMachine.page_size + 2 * PageStoreMachine.page_size // 8
    checks_lru_order = False

    async def _open(self) -> LocalPageStore:
        a = self.page_size + self.page_size // 8
        return await LocalPageStore.open(
            [(self.root / "a", a), (self.root / "b", self.capacity - a)], self.page_size
        )


class MemoryTierMachine(LocalMachine):
    """A memory tier of two pages: every read the model checks may be answered from it, so a
    held page that outlived its file's change shows as a wrong read."""

    async def _open(self) -> LocalPageStore:
        return await LocalPageStore.open(
            [(self.root, self.capacity)], self.page_size, memory_bytes=2 * self.page_size
        )

    async def corrupt(self, store: PageStore, page: PageId, position: int) -> bool:
        return False  # a held page is answered from memory: the damage shows only to a scrub

    @rule(page=PageStoreMachine.pages, change=st.sampled_from(["none", "put", "delete"]),
          seed=st.integers(0, 2**16))  # fmt: skip
    def admit_late(self, page: PageId, change: str, seed: int) -> None:
        """What a lane does: ask, read the page whole, and hold it later on the loop, perhaps
        after the page was replaced or deleted meanwhile."""
        data = self.model.get(page)
        admit = self.store.admission(page)
        if data is None or admit is None:
            return
        if change == "put":
            self.put(page, len(data), seed, direct=False)
        elif change == "delete":
            self.delete(page)
        held = admit(data)
        if change != "none":
            assert not held  # bytes read before the page changed are never held
        elif held:
            assert self.store.held(page) == data
        assert self.store.stats().memory_bytes <= 2 * self.page_size

    def teardown(self) -> None:
        for page, data in self.model.items():
            held = self.store.held(page)
            assert held is None or bytes(held) == data
        super().teardown()


TestMemoryMachine = MemoryMachine.TestCase
TestMemoryMachine.settings = SETTINGS
TestLocalMachine = LocalMachine.TestCase
TestLocalMachine.settings = SETTINGS
TestLocalLfuMachine = LocalLfuMachine.TestCase
TestLocalLfuMachine.settings = settings(SETTINGS, max_examples=40)
TestTwoDirMachine = TwoDirMachine.TestCase
TestTwoDirMachine.settings = settings(SETTINGS, max_examples=40)
TestMemoryTierMachine = MemoryTierMachine.TestCase
TestMemoryTierMachine.settings = SETTINGS
