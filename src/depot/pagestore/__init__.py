"""Local page storage: fixed-size pages of file versions with a quota and verified reads."""

from depot.pagestore.base import Buffer, PageStore, PageStoreStats
from depot.pagestore.format import BLOCK_SIZE
from depot.pagestore.local import DirStats, LocalPageStore
from depot.pagestore.memory import MemoryPageStore

__all__ = [
    "BLOCK_SIZE",
    "Buffer",
    "DirStats",
    "LocalPageStore",
    "MemoryPageStore",
    "PageStore",
    "PageStoreStats",
]
