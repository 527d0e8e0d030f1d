"""fsspec's own abstract test suites, where they apply to a read-only filesystem.

``AbstractGetTests`` (copy depot -> local) is the one that applies; the copy, put, pipe and open
suites write through the filesystem under test and do not (see docs/fsspec.md). The suites build
their source trees with ``fs.touch``/``fs.makedirs``/``fs.pipe``/``fs.rm``; here those are done
on the worker's under-store directory, which is what a user of a read-only mount would do.
"""

from __future__ import annotations

import posixpath
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fsspec.tests.abstract import AbstractFixtures
from fsspec.tests.abstract.get import AbstractGetTests

from depot.client import DepotFileSystem
from depot.core.config import DepotConfig
from depot.testing.local import LocalWorker


class SeededDepotFileSystem(DepotFileSystem):
    """``depot://`` whose setup writes go straight to the UFS directory behind the worker."""

    ufs_root: Path

    def _local(self, path: str) -> Path:
        return self.ufs_root / str(self._strip_protocol(path)).lstrip("/")

    def touch(self, path: str, truncate: bool = True, **kwargs: Any) -> None:
        local = self._local(path)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(b"")

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        local = self._local(path)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(value)

    def pipe(self, path: str, value: bytes | None = None, **kwargs: Any) -> None:
        assert value is not None
        self.pipe_file(path, value)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self._local(path).mkdir(parents=True, exist_ok=exist_ok)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self._local(path).mkdir(parents=create_parents, exist_ok=True)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        local = self._local(path)
        if local.is_dir():
            shutil.rmtree(local)
        else:
            local.unlink()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeededDepotFileSystem]:
    root = tmp_path_factory.mktemp("abstract-ufs")
    cache = tmp_path_factory.mktemp("abstract-cache")
    # Revalidate metadata on every call: the suites delete and recreate trees between steps.
    with LocalWorker(ufs_uri=root.as_uri(), cache_dir=cache, metadata="always") as worker:
        fs = SeededDepotFileSystem(
            endpoint=worker.endpoint, config=DepotConfig(), skip_instance_cache=True
        )
        fs.ufs_root = root
        yield fs
        fs.close()


class TestDepotGet(AbstractFixtures, AbstractGetTests):  # type: ignore[misc]
    @pytest.fixture
    def fs(self, seeded: SeededDepotFileSystem) -> SeededDepotFileSystem:
        return seeded

    @pytest.fixture
    def fs_join(self) -> Callable[..., str]:
        return posixpath.join

    @pytest.fixture
    def fs_path(self) -> str:
        return f"/abstract-{uuid.uuid4().hex[:12]}"

    @pytest.fixture
    def supports_empty_directories(self) -> bool:
        return False  # object stores have no empty directories
