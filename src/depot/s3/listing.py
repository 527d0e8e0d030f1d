"""ListObjects over a directory tree: keys in S3 order, prefixes, delimiters, paging.

The namespace is a tree of directories, S3 is a flat, sorted key space. Walking each directory's
entries sorted by ``name`` for files and ``name + "/"`` for directories, depth first, yields the
keys in exactly S3's (UTF-8 byte) order, so a page is the next ``max_keys`` items of one walk:

- the walk starts at the deepest directory the prefix names (``a/b/c`` starts at ``a/b``) and
  skips entries that cannot start with the prefix;
- a marker (``start-after``, ``marker``, or a continuation token holding the last item of the
  previous page) prunes every subtree whose keys all sort before it, so a page costs the path
  down to the marker plus the page itself, not the keys before it;
- with a delimiter, a subtree whose keys all roll up into one common prefix is not walked at all
  (``/`` as delimiter lists one directory); a common prefix equal to the marker is never repeated,
  so paging through common prefixes terminates;
- directories that will be walked are listed a few ahead, concurrently.

Directories that exist but hold no file show up as common prefixes when a delimiter rolls them up
(S3 has no empty directories; a local file system does).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from depot.core.errors import InvalidPath, NotADirectory, NotFound
from depot.core.types import FileStatus
from depot.namespace.paths import normalize_path

Lister = Callable[[str], Awaitable[list[FileStatus]]]
LOOKAHEAD = 8


@dataclass(slots=True)
class Listing:
    """One page: objects (key, status), common prefixes, and whether more follow."""

    objects: list[tuple[str, FileStatus]] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    truncated: bool = False
    last: str | None = None  # the last key or common prefix of the page


class _Stop(Exception):
    pass


class _Walk:
    def __init__(
        self,
        lister: Lister,
        root: str,
        prefix: str,
        delimiter: str | None,
        after: str | None,
        limit: int,
    ) -> None:
        self.lister = lister
        self.root = root
        self.prefix = prefix
        self.delimiter = delimiter or None
        self.after = after or None
        self.limit = limit
        self.result = Listing()
        self.count = 0
        self.last_prefix: str | None = None
        self.pending: dict[str, asyncio.Task[list[FileStatus]]] = {}

    def _path(self, dir_key: str) -> str:
        """The depot path of the directory whose keys start with ``dir_key`` (``""`` or ``a/b/``)."""
        rel = dir_key[:-1]
        if not rel:
            return self.root
        return "/" + rel if self.root == "/" else f"{self.root}/{rel}"

    async def _entries(self, dir_key: str) -> list[FileStatus]:
        task = self.pending.pop(dir_key, None)
        try:
            if task is not None:
                return await task
            return await self.lister(self._path(dir_key))
        except (NotFound, NotADirectory):
            return []

    def _prefetch(self, dir_keys: list[str]) -> None:
        for dir_key in dir_keys:
            if dir_key not in self.pending and len(self.pending) < LOOKAHEAD:
                self.pending[dir_key] = asyncio.ensure_future(self.lister(self._path(dir_key)))

    def _emit(self, item: str) -> None:
        if self.count >= self.limit:
            self.result.truncated = True
            raise _Stop
        self.count += 1
        self.result.last = item

    def _emit_prefix(self, common: str) -> None:
        if common == self.after or common == self.last_prefix:
            return
        self._emit(common)
        self.last_prefix = common
        self.result.prefixes.append(common)

    def _rollup(self, key: str) -> str | None:
        """The common prefix ``key`` rolls up into, if the delimiter cuts it."""
        if self.delimiter is None or not key.startswith(self.prefix):
            return None
        cut = key.find(self.delimiter, len(self.prefix))
        return None if cut < 0 else key[: cut + len(self.delimiter)]

    async def walk(self, dir_key: str) -> None:
        entries = await self._entries(dir_key)
        items: list[tuple[str, FileStatus]] = []
        for entry in entries:
            name = entry.path.rsplit("/", 1)[-1]
            if not name:
                continue
            items.append((dir_key + name + ("/" if entry.is_dir else ""), entry))
        items.sort(key=lambda item: item[0])
        prefix, after = self.prefix, self.after
        descend: list[str] = []
        plan: list[tuple[str, FileStatus, str | None]] = []
        for key, entry in items:
            if not (key.startswith(prefix) or (entry.is_dir and prefix.startswith(key))):
                continue
            if entry.is_dir:
                if after is not None and key <= after and not after.startswith(key):
                    continue  # every key below sorts before the marker
                common = self._rollup(key)
                if common is not None and (common == after or after is None or key > after):
                    plan.append((key, entry, common))
                    continue
                plan.append((key, entry, None))
                descend.append(key)
            else:
                if after is not None and key <= after:
                    continue
                plan.append((key, entry, self._rollup(key)))
        walked = 0
        for key, entry, common in plan:
            if entry.is_dir:
                if common is not None:
                    self._emit_prefix(common)
                    continue
                walked += 1
                self._prefetch(descend[walked : walked + LOOKAHEAD])
                await self.walk(key)
            elif common is not None:
                self._emit_prefix(common)
            else:
                self._emit(key)
                self.result.objects.append((key, entry))

    async def run(self) -> Listing:
        if self.limit <= 0:
            return self.result
        base = self.prefix[: self.prefix.rfind("/") + 1]
        if base:
            # Keys are canonical paths: a prefix whose directory part is not one matches nothing.
            rel = base[:-1]
            try:
                if not rel or normalize_path(rel)[1:] != rel:
                    return self.result
            except InvalidPath:
                return self.result
        try:
            await self.walk(base)
        except _Stop:
            pass
        finally:
            for task in self.pending.values():
                task.cancel()
            for task in self.pending.values():
                with contextlib.suppress(BaseException):
                    await task
            self.pending.clear()
        return self.result


async def list_keys(
    lister: Lister,
    root: str,
    *,
    prefix: str = "",
    delimiter: str | None = None,
    after: str | None = None,
    limit: int = 1000,
) -> Listing:
    """Up to ``limit`` keys and common prefixes of the tree at ``root``, in S3 order."""
    return await _Walk(lister, root, prefix, delimiter, after, limit).run()
