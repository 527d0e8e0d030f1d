"""Local directories (file://, obstore LocalStore): the contract and what is special to disks."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from depot.core.config import UfsConfig
from depot.core.errors import ConfigError, NotFound, StaleVersion
from depot.testing.ufs_contract import UnderStoreContract, as_bytes, streamed
from depot.ufs import UnderStore, open_backend, open_under_store
from depot.ufs.obstore_store import ObstoreUnderStore


class TestLocalContract(UnderStoreContract):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[UnderStore]:
        root = tmp_path / "root"
        root.mkdir()
        store = open_under_store(root.as_uri(), {}, UfsConfig())
        yield store
        await store.close()


class TestLocalStreamingContract(UnderStoreContract):
    """obstore's streamed GET, which local directories leave off by default, forced on."""

    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[UnderStore]:
        root = tmp_path / "root"
        root.mkdir()
        local = open_backend(root.as_uri(), {}, UfsConfig())
        assert isinstance(local, ObstoreUnderStore) and local.stream_chunk_size == 0
        store = ObstoreUnderStore(
            local.store, local.uri, ordered_listing=False, supports_attributes=False,
            stream_chunk_size=64 * 1024,
        )
        yield store
        await store.close()


async def test_local_stream_comes_in_chunks(tmp_path: Path) -> None:
    local = open_backend(tmp_path.as_uri(), {}, UfsConfig())
    assert isinstance(local, ObstoreUnderStore)
    store = ObstoreUnderStore(local.store, local.uri, ordered_listing=False,
                              supports_attributes=False, stream_chunk_size=64 * 1024)
    data = os.urandom(1024 * 1024)
    info = await store.put("f", data)
    got, sizes = await streamed(store, "f", 0, len(data), etag=info.etag)
    assert got == data and len(sizes) >= 4 and min(sizes[:-1]) >= 64 * 1024


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


async def test_reads_files_written_by_others(root: Path) -> None:
    (root / "sub").mkdir()
    (root / "sub" / "f.txt").write_bytes(b"written outside")
    store = open_backend(root.as_uri(), {}, UfsConfig())
    info = await store.head("sub/f.txt")
    assert info.size == 15
    assert abs(info.mtime - (root / "sub" / "f.txt").stat().st_mtime) < 1e-3
    assert as_bytes(await store.get_range("sub/f.txt", 8, 15)) == b"outside"


async def test_external_replace_is_a_new_version(root: Path) -> None:
    store = open_backend(root.as_uri(), {}, UfsConfig())
    await store.put("f", b"version one")
    old = await store.head("f")
    tmp = root / "f.tmp"
    tmp.write_bytes(b"version two")  # same size, new inode
    os.replace(tmp, root / "f")
    with pytest.raises(StaleVersion):
        await store.get_range("f", 0, 4, etag=old.etag)


async def test_writes_land_in_the_directory(root: Path) -> None:
    store = open_backend(root.as_uri(), {}, UfsConfig())
    await store.put("a/b/c.bin", b"xyz")
    assert (root / "a" / "b" / "c.bin").read_bytes() == b"xyz"
    await store.delete("a/b/c.bin")
    assert not (root / "a").exists()  # empty directories go with their last file
    assert root.exists()


async def test_directory_is_a_prefix_not_an_object(root: Path) -> None:
    (root / "empty").mkdir()
    store = open_backend(root.as_uri(), {}, UfsConfig())
    with pytest.raises(NotFound):
        await store.head("empty")
    page = await store.list("")
    assert page.prefixes == ["empty/"]


async def test_percent_escaped_uri(tmp_path: Path) -> None:
    spaced = tmp_path / "my data"
    spaced.mkdir()
    (spaced / "x").write_bytes(b"1")
    store = open_backend("file://" + str(spaced).replace(" ", "%20"), {}, UfsConfig())
    assert (await store.head("x")).size == 1


def test_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        open_under_store((tmp_path / "nope").as_uri(), {}, UfsConfig())
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ConfigError, match="not a directory"):
        open_under_store((tmp_path / "file").as_uri(), {}, UfsConfig())


def test_mkdir_option_creates_the_directory(tmp_path: Path) -> None:
    target = tmp_path / "new" / "dir"
    open_under_store(target.as_uri(), {"mkdir": "true"}, UfsConfig())
    assert target.is_dir()


def test_unknown_local_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'endpoint'"):
        open_under_store(tmp_path.as_uri(), {"endpoint": "http://x"}, UfsConfig())
