"""``CacheClient`` against a real worker: parallel reads, cache counters, losing the worker."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from depot.client import CacheClient, version_of
from depot.core.config import ClientConfig, DepotConfig, MountConfig
from depot.core.errors import NotFound, StaleVersion
from depot.testing.local import LocalWorker

PAGE = 64 * 1024


def _data(size: int) -> bytes:
    block = os.urandom(1 << 20)
    return (block * (size // len(block) + 1))[:size]


async def test_parallel_reads_and_cache_counters(tmp_path: Path) -> None:
    (tmp_path / "ufs").mkdir()
    data = _data(6 * 1024 * 1024 + 333)
    (tmp_path / "ufs" / "f.bin").write_bytes(data)
    with LocalWorker(
        ufs_uri=(tmp_path / "ufs").as_uri(), cache_dir=tmp_path / "cache", page_size=PAGE
    ) as worker:
        async with CacheClient(worker.endpoint, config=DepotConfig()) as client:
            assert await client.health()
            assert (await client.info())["page_size"] == PAGE
            status = await client.stat("/f.bin")
            assert await client.read_range("/f.bin", 0) == data  # cold: fills the cache
            out = bytearray(len(data))
            count = await client.read_range_into(
                "/f.bin", 0, len(data), memoryview(out), version=version_of(status)
            )
            assert count == len(data) and out == data
            pages = -(-len(data) // PAGE)
            for _ in range(1000):  # pages are stored in the background after a miss
                stats = await client.cache_stats()
                if stats["pages"] >= pages and stats["ufs_inflight"] == 0:
                    break
                await asyncio.sleep(0.01)
            assert stats["pages"] >= pages, stats
            assert stats["ufs_reads"] >= pages  # every page came from the UFS once (read or prefetched)
            await client.read_range("/f.bin", 0)
            after = await client.cache_stats()
            assert after["hits"] - stats["hits"] >= pages, (stats, after)
            before = client.pool.connects
            results = await asyncio.gather(
                *(
                    client.read_range("/f.bin", off, off + 4096)
                    for off in range(0, len(data), 99_991)
                )
            )
            assert results == [data[o : o + 4096] for o in range(0, len(data), 99_991)]
            assert client.pool.connects - before <= client.pool.max_connections
            with pytest.raises(NotFound):
                await client.read_range("/missing", 0, 1)
            with pytest.raises(StaleVersion):
                await client.read_range("/f.bin", 0, 10, version='"e:not-this-one"')


async def test_losing_the_worker_mid_read_falls_back_without_a_wrong_byte(tmp_path: Path) -> None:
    (tmp_path / "ufs").mkdir()
    data = _data(48 * 1024 * 1024)
    (tmp_path / "ufs" / "f.bin").write_bytes(data)
    config = DepotConfig(
        mounts=[MountConfig(path="/", ufs=(tmp_path / "ufs").as_uri())],
        client=ClientConfig(parallelism=2),
    )
    worker = LocalWorker(
        ufs_uri=(tmp_path / "ufs").as_uri(), cache_dir=tmp_path / "cache", page_size=PAGE
    ).start()
    try:
        async with CacheClient(worker.endpoint, config=config) as client:
            status = await client.stat("/f.bin")

            async def stop_soon() -> None:
                await asyncio.sleep(0.05)
                await asyncio.to_thread(worker.stop)

            stopper = asyncio.ensure_future(stop_soon())
            got = await client.read_range(
                "/f.bin", 0, len(data), version=version_of(status), size=status.size
            )
            await stopper
            assert got == data
            assert client.router.is_down(worker.endpoint), "the read finished before the worker stopped"
            assert not await client.health()
            # the rest of the session is served by the under store
            assert await client.read_range("/f.bin", 5, 10) == data[5:10]
    finally:
        worker.stop()
