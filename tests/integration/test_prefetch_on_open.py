"""Prefetch on open (``prefetch_on_open`` of a mount) on real in-process workers: opening a marked
file pulls every page of it into the cache of its segments' owners in the background, one load
request per owner; unmarked files and reopens start nothing; failures never reach the reader."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from depot.client import CacheClient, DepotFileSystem
from depot.core.config import DepotConfig
from depot.core.types import FileStatus
from depot.placement.membership import EmbeddedRegistry
from depot.placement.view import ClusterView
from depot.testing.local import LocalWorker

PAGE = 64 * 1024
SIZE = 20 * PAGE + 123  # 21 pages
PATTERNS = ["*.safetensors", "/data/gguf/*"]
# No worker-side read-ahead: an unmarked file gets exactly the pages that were read.
NO_WORKER_PREFETCH = {"worker": {"prefetch_pages": 0}}


def pages_of(size: int) -> int:
    return -(-size // PAGE)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def cached_pages(w: LocalWorker, path: str) -> list[int]:
    service = w.worker.service
    assert service is not None

    async def go() -> list[int]:
        opened = await service.open(path)
        return service.pages.file_pages(opened.file_id.key)

    result: list[int] = w.call(go())
    return result


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "ufs"
    (root / "data" / "gguf").mkdir(parents=True)
    for name in ("model.safetensors", "other.safetensors", "plain.bin", "gguf/q4.gguf"):
        (root / "data" / name).write_bytes(os.urandom(SIZE))
    (root / "data" / "empty.safetensors").write_bytes(b"")
    return root


def _mounts(data: Path, patterns: list[str] = PATTERNS) -> list[dict[str, Any]]:
    return [{"path": "/", "ufs": data.as_uri(), "prefetch_on_open": patterns}]


@pytest.fixture
def worker(data: Path, tmp_path: Path) -> Iterator[LocalWorker]:
    with LocalWorker(None, tmp_path / "cache", page_size=PAGE, cache_size="64MiB",
                     mounts=_mounts(data), extra=NO_WORKER_PREFETCH) as w:
        yield w


@pytest.fixture
def fs(worker: LocalWorker) -> Iterator[DepotFileSystem]:
    # No mounts of its own: the patterns come with the cluster view the worker serves.
    filesystem = DepotFileSystem(endpoint=worker.endpoint, config=DepotConfig(),
                                 skip_instance_cache=True)
    yield filesystem
    filesystem.close()


def prefetch_stats(fs: DepotFileSystem) -> dict[str, int]:
    stats: dict[str, int] = fs.cache_stats()["client"]["prefetch_on_open"]
    return stats


def test_open_of_a_marked_file_caches_every_page(
    fs: DepotFileSystem, worker: LocalWorker, data: Path
) -> None:
    with fs.open("/data/model.safetensors", "rb") as f:
        assert f.read(1) == (data / "data" / "model.safetensors").read_bytes()[:1]
    want = list(range(pages_of(SIZE)))
    assert wait_for(lambda: cached_pages(worker, "/data/model.safetensors") == want), (
        cached_pages(worker, "/data/model.safetensors")
    )
    assert wait_for(lambda: prefetch_stats(fs)["completed"] == 1)
    stats = prefetch_stats(fs)
    assert stats["triggered"] == 1 and stats["failed"] == 0
    assert stats["requests"] == 1  # one owner: one request
    assert stats["pages"] == pages_of(SIZE)
    assert worker.worker.service is not None
    assert worker.worker.service.stats.loaded_pages >= pages_of(SIZE) - 1  # the read took one
    # a path pattern marks a whole directory
    with fs.open("/data/gguf/q4.gguf", "rb") as f:
        f.read(1)
    assert wait_for(lambda: cached_pages(worker, "/data/gguf/q4.gguf") == want)


def test_unmarked_file_is_not_prefetched(fs: DepotFileSystem, worker: LocalWorker) -> None:
    with fs.open("/data/plain.bin", "rb") as f:
        f.read(1)
    time.sleep(0.5)
    assert cached_pages(worker, "/data/plain.bin") == [0]
    assert prefetch_stats(fs)["triggered"] == 0
    with fs.open("/data/empty.safetensors", "rb") as f:  # marked, empty: nothing to load
        assert f.read() == b""


def test_reopen_does_not_trigger_again(fs: DepotFileSystem, worker: LocalWorker) -> None:
    files = [fs.open("/data/model.safetensors", "rb") for _ in range(8)]
    for f in files:
        f.read(1)
    assert wait_for(lambda: prefetch_stats(fs)["completed"] == 1)
    for f in files:
        f.close()
    with fs.open("/data/model.safetensors", "rb") as f:
        f.read(1)
    time.sleep(0.3)
    stats = prefetch_stats(fs)
    assert stats["triggered"] == 1 and stats["deduplicated"] == 8, stats
    assert stats["requests"] == 1
    # another file is another prefetch
    with fs.open("/data/other.safetensors", "rb") as f:
        f.read(1)
    assert wait_for(lambda: prefetch_stats(fs)["completed"] == 2)


def test_cached_file_costs_one_cheap_request(worker: LocalWorker) -> None:
    async def go() -> tuple[dict[str, int], dict[str, int]]:
        async with CacheClient(worker.endpoint, config=DepotConfig()) as client:
            status = await client.stat("/data/model.safetensors")
            first = await client.prefetch("/data/model.safetensors", status)
            client.prefetcher.window = 0.0  # the window is over: the next open asks again
            assert client.prefetch_on_open("/data/model.safetensors", status)
            for _ in range(200):
                if client.prefetch_stats["completed"] == 1:
                    break
                await asyncio.sleep(0.02)
            return first, client.prefetch_stats

    first, stats = asyncio.run(go())
    assert first["loaded"] == pages_of(SIZE) and first["cached"] == pages_of(SIZE)
    assert stats["completed"] == 1 and stats["requests"] == 2
    assert stats["pages_loaded"] == pages_of(SIZE)  # all from the first, none from the reopen
    assert stats["pages_cached_before"] == pages_of(SIZE)


def test_failure_never_reaches_the_reader(worker: LocalWorker, data: Path) -> None:
    async def go() -> dict[str, int]:
        async with CacheClient(worker.endpoint, config=DepotConfig()) as client:
            status = await client.stat("/data/other.safetensors")
            gone = FileStatus("/data/gone.safetensors", SIZE, status.mtime, etag="x")
            assert client.prefetch_on_open(gone.path, gone)  # the worker answers 404
            data_bytes = await client.read_range("/data/other.safetensors", 0, 10)
            assert data_bytes == (data / "data" / "other.safetensors").read_bytes()[:10]
            for _ in range(200):
                if client.prefetch_stats["failed"]:
                    break
                await asyncio.sleep(0.02)
            # and a client closed while a prefetch runs stops it quietly
            client.prefetch_on_open("/data/other.safetensors", status)
            return client.prefetch_stats

    stats = asyncio.run(go())
    assert stats["failed"] == 1 and stats["triggered"] == 2


def test_bad_ranges_are_refused(worker: LocalWorker) -> None:
    import http.client

    host, port = worker.endpoint.rsplit("/", 1)[1].split(":")
    for query in ("ranges=5-1", "ranges=1-", "ranges=a-b", "ranges=" + ",".join(["0-1"] * 1025)):
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        conn.request("POST", f"/api/v1/cache/load?path=/data/plain.bin&{query}")
        response = conn.getresponse()
        assert response.status == 400, (query, response.read())
        conn.close()


# --- a cluster: segments on different owners -----------------------------------------------------


def test_cluster_prefetch_puts_each_segment_on_its_owner(data: Path, tmp_path: Path) -> None:
    registry = EmbeddedRegistry()
    extra = {**NO_WORKER_PREFETCH, "cluster": {"segment_size": 2 * PAGE}}
    workers = [
        LocalWorker(None, tmp_path / f"w{i}" / "cache", page_size=PAGE, cache_size="64MiB",
                    mounts=_mounts(data), extra=extra, registry=registry).start()
        for i in range(3)
    ]
    try:
        assert workers[0].worker.cluster is not None
        view: ClusterView = workers[0].worker.cluster.view
        assert len(view.ring) == 3
        path = "/data/model.safetensors"
        file_key = view.file_key(path)
        assert file_key is not None
        expected: dict[str, list[int]] = {}
        for index in range(pages_of(SIZE)):
            expected.setdefault(view.route(file_key, index * PAGE)[0].worker_id, []).append(index)
        assert len(expected) > 1  # the segments spread over several workers
        by_id = {w.worker.cluster.worker_id: w for w in workers if w.worker.cluster}

        fs = DepotFileSystem(endpoint=workers[1].endpoint, config=DepotConfig(),
                             skip_instance_cache=True)
        try:
            with fs.open(path, "rb") as f:
                f.seek(SIZE - 1)
                f.read(1)

            def placed() -> bool:
                return all(cached_pages(w, path) == expected.get(wid, [])
                           for wid, w in by_id.items())

            assert wait_for(placed), {wid: cached_pages(w, path) for wid, w in by_id.items()}
            assert wait_for(lambda: prefetch_stats(fs)["completed"] == 1)
            stats = prefetch_stats(fs)
            assert stats["requests"] == len(expected)  # one request per owner
            assert stats["pages"] == pages_of(SIZE)
        finally:
            fs.close()
    finally:
        for w in workers:
            w.stop()


def test_owner_that_refuses_connections_fails_over_to_the_next(
    worker: LocalWorker, data: Path
) -> None:
    """Segments whose owner is down go to the next worker of their key, as reads do."""
    import socket

    from depot.placement.membership import WorkerInfo
    from depot.placement.ring import PlacementPolicy

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert worker.worker.cluster is not None
    served = worker.worker.cluster.view.mounts
    path = "/data/model.safetensors"
    for seed in range(1, 50):  # identities under which the dead worker owns some segments
        dead = WorkerInfo(f"{seed:032x}", dead_endpoint)
        live = WorkerInfo(f"{seed + 1000:032x}", worker.endpoint)
        view = ClusterView(workers=(dead, live), policy=PlacementPolicy(segment_size=2 * PAGE),
                           mounts=served, page_size=PAGE)
        key = view.file_key(path)
        assert key is not None
        owners = {view.route(key, i * 2 * PAGE)[0].endpoint for i in range(-(-SIZE // (2 * PAGE)))}
        if owners == {dead_endpoint, worker.endpoint}:
            break
    else:
        raise AssertionError("no identities found")

    async def go() -> tuple[dict[str, int], dict[str, int], bool]:
        config = DepotConfig.model_validate({"cluster": {"refresh_interval": 3600}})
        async with CacheClient(worker.endpoint, config=config) as client:
            status = await client.stat(path)
            client.router._view = view  # as if the dead worker were still in the ring
            result = await client.prefetch(path, status)
            return result, client.prefetch_stats, client.router.is_down(dead_endpoint)

    result, stats, marked = asyncio.run(go())
    assert result["cached"] == pages_of(SIZE)
    assert cached_pages(worker, path) == list(range(pages_of(SIZE)))
    assert marked  # the dead owner is skipped by the reads that follow
    assert stats["requests"] == 3  # to the dead owner (refused), the live one, then its share
