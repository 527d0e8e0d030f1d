"""Listing entries as the fsspec filesystem hands them out (``fs.ls(path, detail=True)``)."""

from __future__ import annotations

from depot.client.fs import _info, _infos
from depot.core.types import Attributes, FileStatus


def test_listing_entries_take_the_keys_info_gives() -> None:
    """Each entry ends up with exactly ``info``'s keys and values, whatever the worker sent
    beside them (attributes) or left out (an older worker's etag and version)."""
    statuses = [
        FileStatus(path="/d/a.bin", size=3, mtime=5, etag='"e1"', version="v1"),
        FileStatus(path="/d/sub", size=0, mtime=0.0, is_dir=True),
        FileStatus(
            path="/d/b.bin",
            size=7,
            mtime=1.5,
            attributes=Attributes.of({"content-type": "text/plain"}),
        ),
    ]
    entries = [status.to_dict() for status in statuses]
    del entries[1]["etag"], entries[1]["version"]
    assert "attributes" in entries[2]
    out = _infos(entries)
    assert out == [_info(status) for status in statuses]
    assert [type(entry["mtime"]) for entry in out] == [float, float, float]
    assert all(set(entry) == {"name", "size", "type", "mtime", "etag", "version"} for entry in out)
