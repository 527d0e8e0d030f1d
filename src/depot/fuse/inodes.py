"""The inode table of a mount: kernel inode numbers for namespace paths, and what is known of each.

The kernel names files by inode number and counts its references to each (``lookup`` and every
entry of a ``readdirplus`` reply add one, ``forget`` takes them away). An inode lives while the
kernel holds references or a file on it is open; numbers are never reused, and a path whose kind
changes (a file replaced by a directory) gets a new number, as the kernel requires.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from depot.client.client import version_of
from depot.core.types import FileStatus

if TYPE_CHECKING:
    from depot.fuse.reader import FileData
    from depot.fuse.staging import Staged

ROOT_INODE = 1


def join(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


class Inode:
    """One inode: its path, its last known status, the kernel's references and open files."""

    __slots__ = (
        "cached_version",
        "checked",
        "data",
        "ino",
        "lookups",
        "opens",
        "path",
        "staged",
        "status",
    )

    def __init__(self, ino: int, path: str, status: FileStatus) -> None:
        self.ino = ino
        self.path = path
        self.status = status
        #: ``time.monotonic()`` of the last status from the worker (0: never asked).
        self.checked = 0.0
        self.lookups = 0
        self.opens = 0
        #: The version whose bytes the kernel page cache may hold for this inode (None: none).
        self.cached_version: str | None = None
        #: Blocks of file data the mount process holds for the current version.
        self.data: FileData | None = None
        #: The spool of the file while it is open for writing (None: not being written).
        self.staged: Staged | None = None

    @property
    def version(self) -> str | None:
        return None if self.status.is_dir else version_of(self.status)

    def fresh(self, max_age: float) -> bool:
        return self.checked > 0 and time.monotonic() - self.checked <= max_age


class InodeTable:
    """Paths to inode numbers and back."""

    def __init__(self, root_status: FileStatus) -> None:
        root = Inode(ROOT_INODE, "/", root_status)
        root.lookups = 1  # the kernel's reference to the root is never forgotten
        self._by_ino: dict[int, Inode] = {ROOT_INODE: root}
        self._by_path: dict[str, Inode] = {"/": root}
        self._next = ROOT_INODE + 1

    def __len__(self) -> int:
        return len(self._by_ino)

    def get(self, ino: int) -> Inode | None:
        return self._by_ino.get(ino)

    def by_path(self, path: str) -> Inode | None:
        return self._by_path.get(path)

    def remember(self, path: str, status: FileStatus) -> tuple[Inode, str | None]:
        """The inode of ``path`` with ``status`` recorded; and the version it had before, if that
        version differs (its cached bytes are stale), else None."""
        inode = self._by_path.get(path)
        if inode is not None and inode.status.is_dir != status.is_dir and inode.ino != ROOT_INODE:
            del self._by_path[path]  # the old number lives on until the kernel forgets it
            inode = None
        if inode is None:
            inode = Inode(self._next, path, status)
            self._next += 1
            self._by_ino[inode.ino] = inode
            self._by_path[path] = inode
            inode.checked = time.monotonic()
            return inode, None
        return inode, self.update(inode, status)

    @staticmethod
    def update(inode: Inode, status: FileStatus) -> str | None:
        """Record a new status; the version the inode had before if the version changed."""
        before = inode.version
        inode.status = status
        inode.checked = time.monotonic()
        after = inode.version
        return before if before is not None and before != after else None

    def forget(self, ino: int, count: int) -> Inode | None:
        """Drop ``count`` kernel references; the inode if it is gone now."""
        inode = self._by_ino.get(ino)
        if inode is None or ino == ROOT_INODE:
            return None
        inode.lookups = max(0, inode.lookups - count)
        return self.drop_if_unused(inode)

    def drop_if_unused(self, inode: Inode) -> Inode | None:
        if inode.lookups > 0 or inode.opens > 0 or inode.ino == ROOT_INODE:
            return None
        self._by_ino.pop(inode.ino, None)
        if self._by_path.get(inode.path) is inode:
            del self._by_path[inode.path]
        return inode

    def unlink(self, inode: Inode) -> None:
        """The path no longer names ``inode`` (the number lives on until the kernel forgets it)."""
        if self._by_path.get(inode.path) is inode and inode.ino != ROOT_INODE:
            del self._by_path[inode.path]

    def move(self, inode: Inode, path: str) -> None:
        """``inode`` is now named ``path`` (what was there before is unlinked)."""
        self.unlink(inode)
        replaced = self._by_path.get(path)
        if replaced is not None:
            self.unlink(replaced)
        inode.path = path
        self._by_path[path] = inode

    def inodes(self) -> list[Inode]:
        return list(self._by_ino.values())


__all__ = ["ROOT_INODE", "Inode", "InodeTable", "join"]
