"""Reads straight from the under stores when no worker answers.

The design promise is that a reader sees no error when its worker goes away: the client then
serves stat, list and byte ranges from the UFS itself, with the same namespace rules as the
worker (mount points and prefixes with children are directories) and the same version check
(a pinned read never returns bytes of another version).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from depot.core.config import MountConfig, UfsConfig
from depot.core.errors import NotADirectory, NotFound, StaleVersion
from depot.core.types import FileStatus
from depot.namespace import MountTable, Resolved, join_path
from depot.ufs.base import UnderStore, file_status


def strip_etag(tag: str) -> str:
    """The value inside an HTTP entity tag: ``W/"x"`` and ``"x"`` give ``x``."""
    value = tag.strip()
    if value.startswith("W/"):
        value = value[2:]
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return value



def _directory(path: str) -> FileStatus:
    return FileStatus(path=path, size=0, mtime=0.0, is_dir=True)


class UfsFallback:
    """The namespace served from the under stores, without cache."""

    def __init__(self, mounts: Sequence[MountConfig], ufs_config: UfsConfig) -> None:
        self.mount_configs = list(mounts)
        self.table = MountTable.from_config(mounts)
        self._ufs_config = ufs_config
        self._stores: dict[str, UnderStore] = {}
        self._lock = asyncio.Lock()

    def _store(self, resolved: Resolved) -> UnderStore:
        mount = resolved.mount
        store = self._stores.get(mount.path)
        if store is None:
            # Imported here: the backends pull in object-store libraries that a client talking
            # to a healthy worker never needs.
            from depot.ufs.registry import open_under_store

            store = open_under_store(mount.ufs_uri, mount.options, self._ufs_config)
            self._stores[mount.path] = store
        return store

    def _resolve(self, path: str) -> Resolved | None:
        """The mount covering ``path``, or None for a directory above every mount."""
        try:
            return self.table.resolve(path)
        except NotFound:
            if self.table.child_mounts(path):
                return None
            raise

    async def stat(self, path: str) -> FileStatus:
        resolved = self._resolve(path)
        if resolved is None:
            return _directory(path)
        if resolved.key == "":
            return _directory(resolved.path)
        store = self._store(resolved)
        try:
            return file_status(resolved.path, await store.head(resolved.key))
        except NotFound:
            pass
        if self.table.child_mounts(resolved.path):
            return _directory(resolved.path)
        page = await store.list(resolved.key + "/", delimiter="/", limit=1)
        if page.objects or page.prefixes:
            return _directory(resolved.path)
        raise NotFound("no such file or directory", resolved.path)

    async def list(self, path: str) -> list[FileStatus]:
        resolved = self._resolve(path)
        entries: dict[str, FileStatus] = {}
        if resolved is not None:
            store = self._store(resolved)
            prefix = resolved.key + "/" if resolved.key else ""
            token: str | None = None
            while True:
                page = await store.list(prefix, delimiter="/", token=token, limit=1000)
                for info in page.objects:
                    name = info.key[len(prefix) :].strip("/")
                    if name and "/" not in name:
                        entries[name] = file_status(join_path(resolved.path, name), info)
                for pfx in page.prefixes:
                    name = pfx[len(prefix) :].strip("/")
                    if name and "/" not in name and name not in entries:
                        entries[name] = _directory(join_path(resolved.path, name))
                token = page.next_token
                if not token:
                    break
            base = resolved.path
        else:
            base = path
        for name in self.table.child_mounts(base):
            entries[name] = _directory(join_path(base, name))
        if not entries and resolved is not None and resolved.key:
            status = await self.stat(path)
            if not status.is_dir:
                raise NotADirectory("not a directory", status.path)
        return [entries[name] for name in sorted(entries)]

    async def read_into(
        self, path: str, start: int, end: int, out: memoryview, version: str | None = None
    ) -> int:
        """Bytes ``[start, end)`` into ``out``; returns how many there were (fewer at EOF).

        ``version`` is the worker's entity tag of the pinned version (``"e:ETAG"``,
        ``"v:ID"`` or ``"s:SIZE:MTIME"``, quoted); a mismatch raises ``StaleVersion``.
        """
        resolved = self.table.resolve(path)
        store = self._store(resolved)
        etag: str | None = None
        if version is not None:
            tag = strip_etag(version)
            if tag.startswith("e:"):
                etag = tag[2:]  # checked by the store on the same request
            else:
                current = file_status(resolved.path, await store.head(resolved.key))
                if current.version_tag != tag:
                    raise StaleVersion("the file changed since it was opened", resolved.path)
        data = await store.get_range(resolved.key, start, end, etag=etag)
        count = min(len(data), end - start)
        out[:count] = memoryview(data).cast("B")[:count]
        return count

    async def close(self) -> None:
        stores, self._stores = self._stores, {}
        for store in stores.values():
            with contextlib.suppress(Exception):
                await store.close()
