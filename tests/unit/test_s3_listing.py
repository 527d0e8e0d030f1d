"""ListObjects over a directory tree, held against a flat sorted-keys model of S3."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from depot.core.errors import NotADirectory, NotFound
from depot.core.types import FileStatus
from depot.s3.listing import list_keys


class Tree:
    """A namespace holding ``keys`` (files) below ``root``, listed like the worker lists."""

    def __init__(self, keys: set[str], root: str = "/b") -> None:
        self.root = root
        self.files = set(keys)
        self.dirs: dict[str, set[str]] = {root: set()}
        for key in keys:
            parts = key.split("/")
            path = root
            for part in parts[:-1]:
                self.dirs.setdefault(path, set()).add(part + "/")
                path = f"{path}/{part}"
                self.dirs.setdefault(path, set())
            self.dirs.setdefault(path, set()).add(parts[-1])
        self.calls = 0

    async def list(self, path: str) -> list[FileStatus]:
        self.calls += 1
        await asyncio.sleep(0)
        if path not in self.dirs:
            if path[len(self.root) + 1 :] in self.files:
                raise NotADirectory("not a directory", path)
            raise NotFound("no such directory", path)
        out = []
        for name in sorted(self.dirs[path]):
            if name.endswith("/"):
                out.append(FileStatus(f"{path}/{name[:-1]}", 0, 0.0, is_dir=True))
            else:
                out.append(FileStatus(f"{path}/{name}", len(name), 1.0, etag=f'"{name}"'))
        return out


def model(keys: set[str], prefix: str, delimiter: str | None, after: str | None) -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = []
    for key in sorted(keys):
        if not key.startswith(prefix) or (after is not None and key <= after):
            continue
        cut = key.find(delimiter, len(prefix)) if delimiter else -1
        if cut >= 0:
            common = key[: cut + len(delimiter or "")]
            if common == after or (items and items[-1] == ("P", common)):
                continue
            items.append(("P", common))
        else:
            items.append(("K", key))
    return items


def page_items(listing: object) -> list[tuple[str, str]]:
    objects = [("K", key) for key, _ in listing.objects]  # type: ignore[attr-defined]
    prefixes = [("P", p) for p in listing.prefixes]  # type: ignore[attr-defined]
    return sorted(objects + prefixes, key=lambda item: item[1])


segment = st.text(alphabet="ab-.!~é", min_size=1, max_size=3).filter(lambda s: s not in (".", ".."))
key_sets = st.lists(st.lists(segment, min_size=1, max_size=4).map("/".join), max_size=25).map(set)


def consistent(keys: set[str]) -> set[str]:
    """Drop keys that would be a file and a directory at once (a file system cannot hold both)."""
    return {k for k in keys if not any(other.startswith(k + "/") for other in keys)}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    keys=key_sets,
    prefix=st.one_of(st.just(""), st.text(alphabet="ab-./!é", max_size=4)),
    delimiter=st.sampled_from([None, "/", "-", "a", "b/", "!"]),
    after=st.one_of(st.none(), st.text(alphabet="ab-./!~é", max_size=5)),
    limit=st.integers(0, 6),
)
def test_one_page_matches_model(keys: set[str], prefix: str, delimiter: str | None, after: str | None, limit: int) -> None:
    keys = consistent(keys)
    tree = Tree(keys)
    listing = asyncio.run(list_keys(tree.list, "/b", prefix=prefix, delimiter=delimiter, after=after, limit=limit))
    expected = model(keys, prefix, delimiter, after or None)
    got = page_items(listing)
    assert got == expected[:limit]
    # max-keys=0 answers nothing and is not truncated: no marker could continue it
    assert listing.truncated == (len(expected) > limit > 0)
    if got:
        assert listing.last == got[-1][1]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    keys=key_sets,
    prefix=st.sampled_from(["", "a", "a/", "b-", "é"]),
    delimiter=st.sampled_from([None, "/", "-"]),
    limit=st.integers(1, 4),
)
def test_paging_visits_everything_once(keys: set[str], prefix: str, delimiter: str | None, limit: int) -> None:
    keys = consistent(keys)
    tree = Tree(keys)
    seen: list[tuple[str, str]] = []
    after: str | None = None
    for _ in range(200):
        listing = asyncio.run(list_keys(tree.list, "/b", prefix=prefix, delimiter=delimiter, after=after, limit=limit))
        seen.extend(page_items(listing))
        if not listing.truncated:
            break
        after = listing.last
    else:
        raise AssertionError("paging did not end")
    assert seen == model(keys, prefix, delimiter, None)


def test_pages_are_cheap() -> None:
    """A page lists the directories on the way to the marker and the page's own, not all before it."""
    keys = {f"d{i:03d}/f{j:02d}" for i in range(100) for j in range(10)}
    tree = Tree(keys)
    listing = asyncio.run(list_keys(tree.list, "/b", after="d050/f05", limit=10))
    assert [k for k, _ in listing.objects][:2] == ["d050/f06", "d050/f07"]
    assert tree.calls <= 2 + 8  # root, d050, d051 (+ look-ahead of a few siblings)
    tree.calls = 0
    listing = asyncio.run(list_keys(tree.list, "/b", delimiter="/", limit=1000))
    assert len(listing.prefixes) == 100 and tree.calls == 1  # rolled-up directories are not walked
    tree.calls = 0
    listing = asyncio.run(list_keys(tree.list, "/b", prefix="d042/f0", limit=1000))
    assert len(listing.objects) == 10 and tree.calls == 1  # starts at the prefix's directory


def test_missing_and_odd_prefixes() -> None:
    tree = Tree({"a/b", "c"})
    for prefix in ("zz/", "c/", "a//", "../", "a/../", "/", "/a"):
        listing = asyncio.run(list_keys(tree.list, "/b", prefix=prefix))
        assert not listing.objects and not listing.prefixes
