"""The fsspec adapter: the contract over fsspec's memory and local file systems."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import fsspec
import pytest

from depot.core.config import UfsConfig
from depot.core.errors import ConfigError, NotFound, StaleVersion
from depot.testing.ufs_contract import UnderStoreContract, as_bytes
from depot.ufs import UnderStore, open_backend, open_under_store
from depot.ufs.fsspec_store import FsspecUnderStore, info_from_fsspec


class TestFsspecMemoryContract(UnderStoreContract):
    @pytest.fixture
    async def store(self) -> AsyncIterator[UnderStore]:
        root = f"/contract-{uuid.uuid4().hex}"
        store = open_under_store(f"fsspec+memory://{root}/data", {}, UfsConfig())
        yield store
        await store.close()
        fs = fsspec.filesystem("memory")
        if fs.exists(root):
            fs.rm(root, recursive=True)


class TestFsspecLocalContract(UnderStoreContract):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[UnderStore]:
        store = open_under_store(f"fsspec+file://{tmp_path}", {}, UfsConfig())
        yield store
        await store.close()


def test_uri_forms(tmp_path: Path) -> None:
    store = open_backend(f"fsspec+file://{tmp_path}", {}, UfsConfig())
    assert isinstance(store, FsspecUnderStore)
    assert store.base == f"{tmp_path}/"
    mem = open_backend("fsspec+memory://bucket/root", {}, UfsConfig())
    assert isinstance(mem, FsspecUnderStore) and mem.base == "/bucket/root/"


def test_unknown_protocol_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="nosuchproto"):
        open_under_store("fsspec+nosuchproto://x/y", {}, UfsConfig())
    with pytest.raises(ConfigError, match="absolute"):
        open_under_store("fsspec+file://relative/dir", {}, UfsConfig())


def test_options_reach_the_file_system(tmp_path: Path) -> None:
    store = open_backend(f"fsspec+file://{tmp_path}", {"auto_mkdir": "true"}, UfsConfig())
    assert isinstance(store, FsspecUnderStore)
    assert store.fs.auto_mkdir is True
    spool = tmp_path / "spool"
    spool.mkdir()
    store = open_backend("fsspec+memory://x", {"spool_dir": str(spool)}, UfsConfig())
    assert isinstance(store, FsspecUnderStore) and store.spool_dir == str(spool)


def test_info_spellings() -> None:
    s3_like = info_from_fsspec(
        "k", {"size": 3, "ETag": "abc", "LastModified": "2024-01-02T03:04:05Z", "VersionId": "v1"}
    )
    assert s3_like.etag == '"abc"'
    assert s3_like.version == "v1"
    assert s3_like.mtime == 1704164645.0
    plain = info_from_fsspec("k", {"size": 3, "mtime": 10.5, "ino": 7})
    moved = info_from_fsspec("k", {"size": 3, "mtime": 10.5, "ino": 8})
    touched = info_from_fsspec("k", {"size": 3, "mtime": 10.500001, "ino": 7})
    assert plain.etag and len({plain.etag, moved.etag, touched.etag}) == 3
    assert plain.mtime == 10.5


async def test_change_during_read_is_stale(tmp_path: Path) -> None:
    store = open_backend(f"fsspec+file://{tmp_path}", {}, UfsConfig())
    info = await store.put("f", b"0123456789")
    assert isinstance(store, FsspecUnderStore)
    real_cat = store.fs.cat_file

    def cat_then_replace(path: str, start: int | None = None, end: int | None = None) -> bytes:
        data: bytes = real_cat(path, start=start, end=end)
        tmp = tmp_path / "swap"
        tmp.write_bytes(b"ABCDEFGHIJ")
        os.replace(tmp, tmp_path / "f")
        return data

    store.fs.cat_file = cat_then_replace
    with pytest.raises(StaleVersion):
        await store.get_range("f", 0, 5, etag=info.etag)


async def test_directory_is_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    store = open_backend(f"fsspec+file://{tmp_path}", {}, UfsConfig())
    with pytest.raises(NotFound):
        await store.head("d")
    with pytest.raises(NotFound):
        await store.get("d")


async def test_put_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = open_backend(f"fsspec+file://{tmp_path}", {}, UfsConfig())
    await store.put("a/b", b"x")

    async def chunks() -> AsyncIterator[bytes]:
        yield b"y"

    await store.put_multipart("a/c", chunks())
    assert sorted(os.listdir(tmp_path / "a")) == ["b", "c"]
    assert as_bytes(await store.get("a/c")) == b"y"
