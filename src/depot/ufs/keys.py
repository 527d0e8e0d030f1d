"""Key rules and listing pagination shared by every backend.

Every backend accepts the same keys and pages listings the same way, so the worker can switch
stores without learning new edge cases:

* a key is relative to the store root, ``/``-separated, with no leading or trailing ``/``, no
  empty, ``.`` or ``..`` segment and no control character;
* a listing prefix is a plain string prefix (S3 semantics): ``"a/b"`` matches ``a/b.txt`` and
  ``a/bc/d``; ``"a/b/"`` matches only what lies under the directory ``a/b``;
* entries (objects and common prefixes) come back in byte order of their UTF-8 names, and the
  continuation token is the name of the last entry returned, so a token stays valid whatever
  happens to the store between pages (and any name works as a starting point).

Stores that can only list a whole level (or walk a directory tree unordered) keep the sorted
result for a short while (``ListingSnapshots``) and serve the next pages from it: one listing per
walk instead of one per page. Those pages reflect the store as of the first page, which no paged
listing can promise better.
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from depot.core.errors import InvalidArgument, InvalidPath, InvalidRange
from depot.ufs.base import ListPage, ObjectInfo

DELIMITER = "/"
MAX_LIST_LIMIT = 100_000


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise ``InvalidPath``."""
    if not isinstance(key, str) or not key:
        raise InvalidPath("object key must be a non-empty string", str(key))
    if key.startswith("/") or key.endswith("/"):
        raise InvalidPath("object key must not start or end with '/'", key)
    _check_segments(key)
    return key


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a valid listing prefix (``""`` is the whole store)."""
    if not isinstance(prefix, str):
        raise InvalidPath("listing prefix must be a string", str(prefix))
    if prefix.startswith("/"):
        raise InvalidPath("listing prefix must not start with '/'", prefix)
    if prefix.endswith("/"):
        _check_segments(prefix[:-1])
    elif prefix:
        _check_segments(prefix, partial=True)
    return prefix


def check_list_args(delimiter: str | None, limit: int) -> None:
    """Reject delimiters other than ``/`` and limits outside ``[1, MAX_LIST_LIMIT]``."""
    if delimiter is not None and delimiter != DELIMITER:
        raise InvalidArgument(f"only '/' is supported as a delimiter, not {delimiter!r}")
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidArgument(f"list limit must be in [1, {MAX_LIST_LIMIT}], not {limit}")


def check_range(start: int, end: int) -> None:
    """Reject negative or inverted ranges (a range past the end is clipped, not refused)."""
    if start < 0 or end < start:
        raise InvalidRange(f"invalid byte range [{start}, {end})")


def _check_segments(key: str, *, partial: bool = False) -> None:
    segments = key.split("/")
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "":
            raise InvalidPath("key must not contain an empty segment", key)
        # The last segment of a string prefix may be a partial name such as "." (".git").
        if segment in (".", "..") and not (partial and last and segment == "."):
            raise InvalidPath("key must not contain '.' or '..' segments", key)
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in key):
        raise InvalidPath("key must not contain control characters", key)


def split_prefix(prefix: str) -> tuple[str, str]:
    """Split a string prefix into its directory part (``""`` or ending in ``/``) and the rest."""
    cut = prefix.rfind("/") + 1
    return prefix[:cut], prefix[cut:]


def join_key(root: str, key: str) -> str:
    """``root`` (``""`` or without slashes at its ends) joined with a relative key."""
    return f"{root}/{key}" if root else key


def name_of(entry: ObjectInfo | str) -> str:
    return entry if isinstance(entry, str) else entry.key


@dataclass(slots=True)
class _Snapshot:
    entries: Sequence[ObjectInfo | str]
    position: int
    expires: float


class ListingSnapshots:
    """A few recent full listings, so that paging through one costs one listing, not one per page.

    Backends whose store returns a whole level at once (or an unordered walk) sort it once and
    serve the following pages from here while the caller walks forward. A token not found here
    (expired, evicted, another process) simply causes a fresh listing: tokens stay stateless.
    """

    def __init__(self, max_entries: int = 32, ttl: float = 30.0) -> None:
        self._max = max_entries
        self._ttl = ttl
        self._items: OrderedDict[tuple[str, str | None, str], _Snapshot] = OrderedDict()

    def next_page(
        self, prefix: str, delimiter: str | None, token: str | None, limit: int
    ) -> ListPage | None:
        """The page after ``token`` cut from a kept listing, or None: list afresh."""
        cached = self.take(prefix, delimiter, token)
        if cached is None:
            return None
        snapshot, position = cached
        return page_from_sorted(
            snapshot, start=position, limit=limit, snapshots=self, prefix=prefix, delimiter=delimiter
        )

    def take(
        self, prefix: str, delimiter: str | None, token: str | None
    ) -> tuple[Sequence[ObjectInfo | str], int] | None:
        if token is None:
            return None
        snap = self._items.pop((prefix, delimiter, token), None)
        if snap is None or snap.expires < time.monotonic():
            return None
        return snap.entries, snap.position

    def keep(
        self,
        prefix: str,
        delimiter: str | None,
        token: str,
        entries: Sequence[ObjectInfo | str],
        position: int,
    ) -> None:
        self._items[(prefix, delimiter, token)] = _Snapshot(
            entries, position, time.monotonic() + self._ttl
        )
        while len(self._items) > self._max:
            self._items.popitem(last=False)


def sort_entries(entries: Iterable[ObjectInfo | str]) -> list[ObjectInfo | str]:
    """Entries in byte order of their UTF-8 names (what S3 returns, and what tokens rely on)."""
    return sorted(entries, key=lambda e: name_of(e).encode("utf-8", "surrogatepass"))


def _after(entries: Sequence[ObjectInfo | str], token: str) -> int:
    names = _NameView(entries)
    return bisect.bisect_right(names, token.encode("utf-8", "surrogatepass"))


class _NameView(Sequence[bytes]):
    """The encoded names of a sorted entry list, for ``bisect`` without building a copy."""

    def __init__(self, entries: Sequence[ObjectInfo | str]) -> None:
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> bytes:  # type: ignore[override]
        return name_of(self._entries[index]).encode("utf-8", "surrogatepass")


def page_from_sorted(
    entries: Sequence[ObjectInfo | str],
    *,
    start: int,
    limit: int,
    snapshots: ListingSnapshots | None = None,
    prefix: str = "",
    delimiter: str | None = None,
) -> ListPage:
    """Cut the page ``entries[start:start+limit]`` and remember the rest for the next call."""
    chunk = entries[start : start + limit]
    page = ListPage()
    for entry in chunk:
        if isinstance(entry, str):
            page.prefixes.append(entry)
        else:
            page.objects.append(entry)
    if start + limit < len(entries) and chunk:
        page.next_token = name_of(chunk[-1])
        if snapshots is not None:
            snapshots.keep(prefix, delimiter, page.next_token, entries, start + limit)
    return page


def paginate(
    entries: Iterable[ObjectInfo | str],
    *,
    token: str | None,
    limit: int,
    snapshots: ListingSnapshots | None = None,
    prefix: str = "",
    delimiter: str | None = None,
) -> ListPage:
    """Sort a complete listing and return the page that follows ``token``."""
    ordered = sort_entries(entries)
    start = _after(ordered, token) if token is not None else 0
    return page_from_sorted(
        ordered,
        start=start,
        limit=limit,
        snapshots=snapshots,
        prefix=prefix,
        delimiter=delimiter,
    )


def collapse(
    keys_and_infos: Iterable[ObjectInfo], prefix: str, delimiter: str | None
) -> list[ObjectInfo | str]:
    """Filter a recursive listing by ``prefix`` and, with a delimiter, fold deeper keys into
    common prefixes (``a/b/c`` under ``a/`` becomes ``a/b/``)."""
    out: list[ObjectInfo | str] = []
    seen: set[str] = set()
    for info in keys_and_infos:
        if not info.key.startswith(prefix):
            continue
        if delimiter is not None:
            cut = info.key.find(delimiter, len(prefix))
            if cut >= 0:
                common = info.key[: cut + 1]
                if common not in seen:
                    seen.add(common)
                    out.append(common)
                continue
        out.append(info)
    return out
