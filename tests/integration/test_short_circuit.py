"""Short-circuit local reads: a client on the worker's node reads its page files directly."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from depot.client import CacheClient, version_of
from depot.client.shortcircuit import ShortCircuit
from depot.core.config import ClientConfig, DepotConfig
from depot.core.errors import StaleVersion
from depot.core.types import FileId, PageId
from depot.pagestore import direct
from depot.pagestore.direct import PageFiles, check_local, decode_touched, encode_touched
from depot.pagestore.local import LocalPageStore
from depot.testing.local import LocalWorker

PAGE = 64 * 1024
SIZE = 20 * PAGE + 4321  # 21 pages, the last one short


@pytest.fixture()
def env(tmp_path: Path) -> Iterator[tuple[LocalWorker, Path, bytes]]:
    ufs = tmp_path / "ufs"
    ufs.mkdir()
    data = os.urandom(SIZE)
    (ufs / "f.bin").write_bytes(data)
    with LocalWorker(ufs_uri=ufs.as_uri(), cache_dir=tmp_path / "cache", page_size=PAGE) as worker:
        yield worker, ufs, data


def _config(short_circuit: bool = True) -> DepotConfig:
    return DepotConfig(client=ClientConfig(short_circuit=short_circuit))


def _store(worker: LocalWorker) -> LocalPageStore:
    pages = worker.worker._pages
    assert pages is not None
    return pages


def _read_stats(worker: LocalWorker) -> dict[str, Any]:
    assert worker.worker.service is not None
    if worker.worker.lanes is not None:
        worker.worker.lanes.flush_accounts()  # reads sent by hot lanes, not accounted yet
    return worker.worker.service.stats.to_dict()


async def _warm(client: CacheClient, worker: LocalWorker, path: str = "/f.bin") -> str:
    """Read the file once (cold, over HTTP) and wait until its pages are stored; its key."""
    status = await client.stat(path)
    out = bytearray(status.size)
    assert await client.read_range_into(path, 0, status.size, memoryview(out)) == status.size
    view = await client.router.current_view()
    assert view is not None
    uri = view.file_key(path)
    assert uri is not None
    key = FileId(uri, status.version_tag).key
    pages = -(-status.size // PAGE)
    for _ in range(500):
        if len(_store(worker).file_pages(key)) >= pages:
            break
        await asyncio.sleep(0.01)
    assert len(_store(worker).file_pages(key)) == pages
    return key


async def _read(client: CacheClient, start: int, end: int, version: str | None = None) -> bytes:
    out = bytearray(end - start)
    count = await client.read_range_into("/f.bin", start, end, memoryview(out), version=version)
    return bytes(out[:count])


def _sc(client: CacheClient) -> ShortCircuit:
    assert client.short_circuit is not None
    return client.short_circuit


RANGES = [
    (0, SIZE),
    (1, 70_000),
    (PAGE - 1, PAGE + 1),
    (3 * PAGE - 5, 7 * PAGE + 11),
    (5 * PAGE, 6 * PAGE),
    (SIZE - 4321, SIZE),
    (SIZE - 10, SIZE + 500),  # past the end: cut short
    (12345, 12346),
]


async def test_hot_reads_go_through_page_files_and_are_accounted(
    env: tuple[LocalWorker, Path, bytes],
) -> None:
    worker, _, data = env
    async with CacheClient(worker.endpoint, config=_config()) as client:
        key = await _warm(client, worker)
        before = _read_stats(worker)
        sc = _sc(client)
        pages_before, missing_before = sc.stats.pages, sc.stats.missing
        for start, end in RANGES:
            assert await _read(client, start, end) == data[start:end], (start, end)
        status = await client.stat("/f.bin")
        assert await _read(client, 100, 200_000, version_of(status)) == data[100:200_000]
        assert await client.read_range("/f.bin", 7, 9) == data[7:9]
        assert await client.read_range("/f.bin", 0, SIZE, size=SIZE) == data
        after = _read_stats(worker)
        # No read reached the worker over HTTP...
        assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])
        read_pages = sc.stats.pages - pages_before
        assert read_pages >= 21 + 21
        assert sc.stats.missing == missing_before and sc.stats.corrupt == 0
        # ...and the worker counts them once the client reports them.
        await sc.flush()
        reported = _read_stats(worker)
        assert reported["short_circuit_hits"] == sc.stats.pages
        assert reported["short_circuit_bytes"] == sc.stats.bytes
        assert reported["hits"] - before["hits"] == read_pages
        assert reported["bytes_from_cache"] - before["bytes_from_cache"] == sc.stats.bytes
        assert len(_store(worker).file_pages(key)) == 21


async def test_cold_chunks_are_filled_by_the_worker_then_read_here(
    env: tuple[LocalWorker, Path, bytes],
) -> None:
    """A chunk of a page or more whose pages are not stored yet: the worker fetches them into
    its store (counted as its misses, once), and the client reads them from the page files;
    a smaller read of a cold page goes over HTTP."""
    worker, _, data = env
    async with CacheClient(worker.endpoint, config=_config()) as client:
        sc = _sc(client)
        await client.stat("/f.bin")
        before = _read_stats(worker)
        assert await _read(client, 3 * PAGE - 5, 5 * PAGE + 7) == data[3 * PAGE - 5 : 5 * PAGE + 7]
        assert (sc.stats.fills, sc.stats.fill_bytes, sc.stats.reads) == (1, 2 * PAGE + 12, 0)
        after = _read_stats(worker)
        assert after["misses"] - before["misses"] == 4  # pages 2-5, fetched for this reader
        assert after["bytes_from_ufs"] - before["bytes_from_ufs"] == 4 * PAGE
        assert after["hits"] == before["hits"]
        # The same pages again: plain hits, from the page files.
        assert await _read(client, 2 * PAGE, 6 * PAGE) == data[2 * PAGE : 6 * PAGE]
        assert (sc.stats.fills, sc.stats.reads, sc.stats.pages) == (1, 1, 4)
        # Less than a page of a cold page: over HTTP, which streams it.
        assert await _read(client, 10 * PAGE + 1, 10 * PAGE + 100) == data[10 * PAGE + 1 : 10 * PAGE + 100]
        assert sc.stats.fills == 1 and sc.stats.missing == 1
        await sc.flush()
        assert _read_stats(worker)["short_circuit_hits"] == sc.stats.pages  # fills are no hits


async def test_fills_off_send_cold_chunks_over_http(env: tuple[LocalWorker, Path, bytes]) -> None:
    worker, _, data = env
    config = DepotConfig(client=ClientConfig(short_circuit=True, short_circuit_fills=False))
    async with CacheClient(worker.endpoint, config=config) as client:
        assert await _read(client, 0, 4 * PAGE) == data[: 4 * PAGE]
        sc = _sc(client)
        assert (sc.stats.fills, sc.stats.missing) == (0, 1)


async def test_a_fill_the_store_cannot_keep_falls_back_to_http(tmp_path: Path) -> None:
    """Pages the worker could not keep (a cache smaller than the chunk) are read over HTTP
    after the fill: one fill, then the bytes from the worker, never a wrong byte."""
    ufs = tmp_path / "ufs"
    ufs.mkdir()
    data = os.urandom(SIZE)
    (ufs / "f.bin").write_bytes(data)
    with LocalWorker(ufs_uri=ufs.as_uri(), cache_dir=tmp_path / "cache", page_size=PAGE,
                     cache_size=2 * PAGE) as worker:
        async with CacheClient(worker.endpoint, config=_config()) as client:
            assert await _read(client, 0, SIZE) == data
            sc = _sc(client)
            assert sc.stats.fills >= 1 and sc.stats.fill_bytes == 0 and sc.stats.reads == 0


async def test_hits_report_refreshes_eviction_order(env: tuple[LocalWorker, Path, bytes]) -> None:
    worker, _, _data = env
    async with CacheClient(worker.endpoint, config=_config()) as client:
        key = await _warm(client, worker)
        policy = _store(worker)._policy
        oldest = policy.victim()  # the least recently used page goes first
        assert oldest is not None and oldest.file_key == key
        await _read(client, oldest.index * PAGE, oldest.index * PAGE + 10)
        assert policy.victim() == oldest  # a short-circuit read alone does not tell the worker
        await _sc(client).flush()
        assert policy.victim() != oldest  # the report did


async def test_corrupt_page_is_never_served(env: tuple[LocalWorker, Path, bytes]) -> None:
    worker, _, data = env
    async with CacheClient(worker.endpoint, config=_config()) as client:
        key = await _warm(client, worker)
        path = _store(worker).page_file(PageId(key, 2))
        assert path is not None
        raw = bytearray(path.read_bytes())
        raw[PAGE // 2] ^= 0xFF
        path.write_bytes(raw)  # in place: what a bad disk does
        sc = _sc(client)
        dropped = _store(worker).stats().corrupt_dropped
        assert await _read(client, 2 * PAGE, 3 * PAGE) == data[2 * PAGE : 3 * PAGE]
        assert sc.stats.corrupt == 1
        assert _store(worker).stats().corrupt_dropped == dropped + 1  # the worker dropped it
        assert _read_stats(worker)["misses"] >= 1
        # A block the read does not touch is not checked: bytes outside it still verify.
        assert await _read(client, 0, PAGE) == data[:PAGE]


async def test_page_gone_between_plan_and_read_falls_back(
    env: tuple[LocalWorker, Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker, _, data = env
    async with CacheClient(worker.endpoint, config=_config()) as client:
        key = await _warm(client, worker)
        sc = _sc(client)
        missing = sc.stats.missing
        original = PageFiles.open
        gone: list[PageId] = []

        def evict_first(self: PageFiles, page: PageId) -> int:
            if page == PageId(key, 4):
                worker.call(_store(worker).delete(page))
                gone.append(page)
            return original(self, page)

        monkeypatch.setattr(PageFiles, "open", evict_first)
        assert await _read(client, 3 * PAGE, 6 * PAGE) == data[3 * PAGE : 6 * PAGE]
        assert gone and sc.stats.missing == missing + 1

        # Unlinked after open: the fd still reads the whole, valid page.
        def unlink_after(self: PageFiles, page: PageId) -> int:
            fd = original(self, page)
            if page == PageId(key, 7):
                file = _store(worker).page_file(page)
                assert file is not None
                os.unlink(file)
            return fd

        monkeypatch.setattr(PageFiles, "open", unlink_after)
        reads = sc.stats.reads
        assert await _read(client, 7 * PAGE + 3, 8 * PAGE - 3) == data[7 * PAGE + 3 : 8 * PAGE - 3]
        assert sc.stats.reads == reads + 1


async def test_overwritten_file_never_reads_old_pages(
    env: tuple[LocalWorker, Path, bytes],
) -> None:
    worker, ufs, data = env
    async with CacheClient(worker.endpoint, config=_config()) as client:
        old_key = await _warm(client, worker)
        old = await client.stat("/f.bin")
        assert await _read(client, 0, PAGE) == data[:PAGE]
        new = os.urandom(SIZE + 999)
        (ufs / "f.bin").write_bytes(new)
        # Revalidate: the worker forgets its status (as max-age running out would) and stats.
        service = worker.worker.service
        assert service is not None
        view = await client.router.current_view()
        assert view is not None
        uri = view.file_key("/f.bin")
        assert uri is not None
        service.metadata.invalidate(uri)
        status = await client.stat("/f.bin")
        assert status.version_tag != old.version_tag
        for _ in range(200):  # the old version's pages are dropped in the background
            if not _store(worker).file_pages(old_key):
                break
            await asyncio.sleep(0.01)
        sc = _sc(client)
        pages = sc.stats.pages
        assert await _read(client, 0, len(new)) == new
        assert sc.stats.pages == pages  # the new version is not cached yet: all over HTTP
        # A reader pinned to the old version is told it is stale, not served old pages.
        with pytest.raises(StaleVersion):
            await _read(client, 0, PAGE, version=version_of(old))
        assert sc.stats.pages == pages and sc.stats.skipped >= 1


async def test_short_circuit_off_reads_over_http(env: tuple[LocalWorker, Path, bytes]) -> None:
    worker, _, data = env
    async with CacheClient(worker.endpoint, config=_config(short_circuit=False)) as client:
        assert client.short_circuit is None
        await _warm(client, worker)
        hits = _read_stats(worker)["hits"]
        assert await _read(client, 0, SIZE) == data
        assert _read_stats(worker)["hits"] - hits == 21


async def test_other_node_or_missing_dir_reads_over_http(
    env: tuple[LocalWorker, Path, bytes],
) -> None:
    worker, _, data = env
    async with CacheClient(worker.endpoint, config=_config()) as client:
        _sc(client).identity = {**direct.host_identity(), "boot_id": "another-node-boot-id"}
        await _warm(client, worker)
        hits = _read_stats(worker)["hits"]
        assert await _read(client, 0, SIZE) == data
        assert _read_stats(worker)["hits"] - hits == 21
        assert _sc(client).stats.pages == 0
        assert _sc(client).to_dict()["local_workers"] == []
        info = await client.info()
    assert check_local(info)[0] is not None
    other_dir = {**info, "local": {**info["local"], "cache_dirs": ["/nonexistent/depot-cache"]}}
    store, why = check_local(other_dir)
    assert store is None and "not visible" in why
    other_worker = {**info, "worker_id": "00000000-0000-0000-0000-000000000000"}
    assert check_local(other_worker)[0] is None
    assert check_local({**info, "local": None})[0] is None


def test_touched_pages_round_trip() -> None:
    pages = {"k1": {0, 1, 2, 3, 7, 9, 10}, "k2": {5}}
    text = encode_touched(pages)
    assert text == "k1:0-3,7,9-10;k2:5"
    assert decode_touched(text) == [PageId("k1", i) for i in (0, 1, 2, 3, 7, 9, 10)] + [
        PageId("k2", 5)
    ]
    for bad in ("k1", "k1:3-1", "k1:x", ":1", "k1:1-"):
        with pytest.raises(ValueError):
            decode_touched(bad)
    with pytest.raises(ValueError):
        decode_touched("k:0-99999999")


def test_fsspec_large_local_reads_skip_read_ahead(env: tuple[LocalWorker, Path, bytes]) -> None:
    """Reads of a block or more from local page files land in the caller's buffer directly (a
    read-ahead block would only add a copy); small sequential reads still get read-ahead."""
    import fsspec

    worker, _, data = env
    fs = fsspec.filesystem("depot", endpoint=worker.endpoint, config=_config(),
                           skip_instance_cache=True)
    try:
        with fs.open("/f.bin", "rb") as f:
            first = 4 * PAGE
            assert f.read(first) == data[:first]
            block = 1024 * 1024  # the read-ahead block: pages of at least 1 MiB together
            out = bytearray(block)
            assert f.readinto(out) == block
            assert bytes(out) == data[first : first + block]
            assert not f._blocks, "read-ahead started for a large local read"
            assert f.read() == data[first + block :]
        with fs.open("/f.bin", "rb") as f:
            assert f.read(1000) == data[:1000]
            assert f.read(1000) == data[1000:2000]
            assert f._blocks  # small reads: one block serves many
            in_flight = [b.future for b in f._blocks.values() if b.future is not None]
        # A read-ahead block already running when its file closed finishes (and is counted).
        concurrent.futures.wait(in_flight)
        client_state = fs._loops.get(fs.loop)
        assert client_state is not None
        sc = client_state.client.short_circuit
        assert sc is not None and sc.stats.reads > 0
        # Reads served in the caller's thread are accounted on the loop and reach the worker.
        before = fs.cache_stats()  # reports what was read so far
        with fs.open("/f.bin", "rb") as f:
            assert f.read() == data
        stats = fs.cache_stats()
        assert stats["short_circuit_bytes"] - before["short_circuit_bytes"] == SIZE
        assert stats["hits"] - before["hits"] == -(-SIZE // PAGE)
        assert (stats["hits"], stats["misses"]) == (_read_stats(worker)["hits"],
                                                    _read_stats(worker)["misses"])
    finally:
        fs.close()


def test_caller_thread_reads_share_a_wake_of_the_loop(
    env: tuple[LocalWorker, Path, bytes],
) -> None:
    """Reads served in the caller's thread are counted at once, and their hits reach the worker,
    but the reads of a while share one wake of the event loop, not one each."""
    import fsspec

    worker, _, data = env
    fs = fsspec.filesystem("depot", endpoint=worker.endpoint, config=_config(),
                           skip_instance_cache=True)  # fmt: skip
    try:
        with fs.open("/f.bin", "rb") as f:
            assert f.read() == data  # warms the pages and finds the local worker
        client = fs.client_now()
        assert client is not None
        sc = _sc(client)
        before = fs.cache_stats()  # reports what was read so far
        sc.handoff_delay = 60.0  # the reads below all come within one while
        wakes: list[int] = []
        take_later = sc._take_handoff_later

        def counted() -> None:
            wakes.append(1)
            take_later()

        sc._take_handoff_later = counted  # type: ignore[method-assign]
        reads, pages = sc.stats.reads, sc.stats.pages
        out = bytearray(16 * PAGE)  # a read-ahead block or more: read in this thread
        with fs.open("/f.bin", "rb") as f:
            for i in range(4):  # the file has 21 pages
                f.seek(i * PAGE)
                assert f.readinto(out) == len(out)
                assert out == data[i * PAGE : (i + 16) * PAGE]
                assert sc.stats.reads == reads + i + 1  # counted by the reading thread
        assert sc.stats.pages == pages + 4 * 16
        assert len(wakes) == 1
        stats = fs.cache_stats()  # takes what was handed over (not waiting for the while)
        assert stats["short_circuit_bytes"] - before["short_circuit_bytes"] == 4 * 16 * PAGE
        assert stats["short_circuit_hits"] - before["short_circuit_hits"] == 4 * 16
        # Without a flush, what reads hand over reaches the worker by itself.
        sc.handoff_delay = sc.report_interval = 0.05
        sc._take_handoff_later = take_later  # type: ignore[method-assign]
        hits = _read_stats(worker)["short_circuit_hits"]
        with fs.open("/f.bin", "rb") as f:
            assert f.readinto(out) == len(out)
        deadline = time.monotonic() + 10
        while _read_stats(worker)["short_circuit_hits"] < hits + 16:
            assert time.monotonic() < deadline, "the hits of a read were never reported"
            time.sleep(0.02)
    finally:
        fs.close()


@pytest.mark.parametrize("keep", [True, False])
def test_large_local_reads_keep_freed_results(
    env: tuple[LocalWorker, Path, bytes], monkeypatch: pytest.MonkeyPatch, keep: bool
) -> None:
    """A read of 1 MiB or more into a new result asks the allocator to keep freed results
    (``client.keep_freed_blocks``); smaller ones, or the setting off, leave it alone."""
    import fsspec

    import depot.client.fs as fs_module

    worker, _, data = env
    config = DepotConfig(client=ClientConfig(keep_freed_blocks=keep))
    fs = fsspec.filesystem("depot", endpoint=worker.endpoint, config=config,
                           skip_instance_cache=True)  # fmt: skip
    try:

        async def warm() -> None:
            async with CacheClient(worker.endpoint, config=_config()) as client:
                await _warm(client, worker)

        asyncio.run(warm())  # every page stored
        calls: list[int] = []
        monkeypatch.setattr(fs_module, "keep_freed_blocks", lambda: calls.append(1) or True)
        with fs.open("/f.bin", "rb") as f:
            client = fs.client_now()
            assert client is not None
            reads = _sc(client).stats.reads
            assert f.read(PAGE) == data[:PAGE]  # small: not asked
            assert not calls
            assert f.read() == data[PAGE:]  # 1.2 MiB from the page files, a new result
        assert _sc(client).stats.reads > reads
        assert bool(calls) is keep
    finally:
        fs.close()


def test_results_of_reads_the_loop_serves_are_made_in_the_callers_thread(
    env: tuple[LocalWorker, Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold local read goes to the event loop (the worker fills the pages first), but its
    result is made in the caller's thread: glibc gave the loop thread a heap of its own, which
    it unmaps when empty, so each such result faulted in fresh memory."""
    import threading

    import fsspec

    import depot.client.client as client_module
    import depot.client.fs as fs_module

    worker, _, data = env
    made: list[tuple[int, str]] = []  # (size, thread) of each result made

    def recording(alloc: Any) -> Any:
        def alloc_result(size: int) -> Any:
            made.append((size, threading.current_thread().name))
            return alloc(size)

        return alloc_result

    for module in (fs_module, client_module):
        monkeypatch.setattr(module, "alloc_result", recording(module.alloc_result))
    fs = fsspec.filesystem("depot", endpoint=worker.endpoint, config=_config(),
                           skip_instance_cache=True)  # fmt: skip
    try:
        with fs.open("/f.bin", "rb") as f:
            assert f.read() == data  # cold: filled by the worker, then read from its files
            client = fs.client_now()
            assert client is not None
            assert _sc(client).stats.fills >= 1
    finally:
        fs.close()
    assert made == [(SIZE, threading.current_thread().name)]
