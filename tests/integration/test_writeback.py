"""Write-back through a worker (docs/writes.md): read-your-writes before the upload, sync, stats,
the staging quota, deletes of pending writes, ``depot sync``, and kill -9 crash rounds against a
real worker process over a local-directory under store."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from depot.cli.main import cli
from depot.client import CacheClient, version_of
from depot.core.config import DepotConfig, load_config
from depot.core.errors import ConfigError, NoSpace
from depot.testing import writeback_crash
from depot.testing.local import LocalWorker

PAGE = 64 * 1024
SLOW = "512KiB"  # upload bandwidth: a 2 MiB file stays staged for about 3 s


def _worker(tmp_path: Path, **writeback: Any) -> LocalWorker:
    ufs = tmp_path / "ufs"
    ufs.mkdir(exist_ok=True)
    mounts = [
        {"path": "/", "ufs": ufs.as_uri(), "write_mode": "write-back"},
    ]
    return LocalWorker(
        None, tmp_path / "cache", page_size=PAGE, mounts=mounts,
        extra={"writeback": writeback} if writeback else None,
    )


@pytest.fixture
def slow_worker(tmp_path: Path) -> Iterator[LocalWorker]:
    with _worker(tmp_path, bandwidth=SLOW) as w:
        yield w


def test_config_accepts_write_back() -> None:
    cfg = load_config(
        environ={},
        overrides={
            "mounts": [{"path": "/", "ufs": "file:///tmp", "write_mode": "write-back"}],
            "writeback": {"quota": "1GiB", "bandwidth": "100MiB", "concurrency": 2},
        },
    )
    assert cfg.mounts[0].write_mode == "write-back"
    assert cfg.writeback.quota == 1024**3 and cfg.writeback.bandwidth == 100 * 1024**2
    assert cfg.writeback.staging_dir(cfg.cache) == cfg.cache.dirs[0].path / "writeback"
    with pytest.raises(ConfigError):
        load_config(environ={}, overrides={"writeback": {"bogus": 1}})


async def test_read_your_writes_before_upload(slow_worker: LocalWorker, tmp_path: Path) -> None:
    ufs = tmp_path / "ufs"
    (ufs / "d").mkdir()
    (ufs / "d" / "f.bin").write_bytes(b"old content")
    data = os.urandom(2 * 1024 * 1024 + 17)
    async with CacheClient(slow_worker.endpoint, config=DepotConfig()) as client:
        assert bytes(await client.read_range("/d/f.bin", 0, 11)) == b"old content"
        status = await client.write("/d/f.bin", data)
        assert status.size == len(data) and status.etag and status.etag.startswith("wb-")
        # Acknowledged; the under store still has the old bytes, this worker serves the new.
        assert (ufs / "d" / "f.bin").read_bytes() == b"old content"
        st = await client.stat("/d/f.bin")
        assert st.size == len(data) and st.etag == status.etag
        assert bytes(await client.read_range("/d/f.bin", 0, len(data))) == data
        assert bytes(await client.read_range("/d/f.bin", 100_000, 100_100)) == data[
            100_000:100_100
        ]
        stats = (await client.cache_stats())["writeback"]
        assert stats["dirty_bytes"] == len(data) and stats["queue_length"] == 1
        assert stats["oldest_dirty_age"] >= 0 and stats["failures"] == []
        # Not synced yet: a no-wait sync reports it pending.
        pending = await client.sync("/d/f.bin", wait=False)
        assert pending["synced"] is False and pending["dirty_bytes"] == len(data)
        done = await client.sync("/d/f.bin", wait=True, deadline=30)
        assert done["synced"] is True
        assert (ufs / "d" / "f.bin").read_bytes() == data
        after = await client.stat("/d/f.bin")
        assert after.size == len(data) and not (after.etag or "").startswith("wb-")
        assert bytes(await client.read_range("/d/f.bin", 0, len(data))) == data
        # A reader that opened the file before the upload landed is pinned to the provisional
        # version: it keeps reading the same bytes, now from the uploaded object.
        pinned = version_of(st)
        assert bytes(await client.read_range("/d/f.bin", 1000, 300_000, version=pinned)) == data[
            1000:300_000
        ]
        stats = (await client.cache_stats())["writeback"]
        assert stats["dirty_bytes"] == 0 and stats["queue_length"] == 0
        assert stats["uploaded"] == 1 and stats["upload_rate"] > 0
        entries = {e.path: e for e in await client.list("/d")}
        assert entries["/d/f.bin"].size == len(data)


async def test_new_file_and_overwrites_last_close_wins(slow_worker: LocalWorker,
                                                       tmp_path: Path) -> None:
    ufs = tmp_path / "ufs"
    async with CacheClient(slow_worker.endpoint, config=DepotConfig()) as client:
        versions = [os.urandom(600_000) for _ in range(3)]
        for v in versions:
            await client.write("/new/x.bin", v)
        assert bytes(await client.read_range("/new/x.bin", 0, 600_000)) == versions[-1]
        await client.sync(wait=True, deadline=30)
        assert (ufs / "new" / "x.bin").read_bytes() == versions[-1]
        stats = (await client.cache_stats())["writeback"]
        assert stats["superseded"] >= 1 and stats["failures"] == []


async def test_delete_and_rename_sync_pending_first(slow_worker: LocalWorker,
                                                    tmp_path: Path) -> None:
    ufs = tmp_path / "ufs"
    async with CacheClient(slow_worker.endpoint, config=DepotConfig()) as client:
        await client.write("/gone.bin", os.urandom(300_000))
        await client.delete("/gone.bin")
        data = os.urandom(300_000)
        await client.write("/a.bin", data)
        await client.rename("/a.bin", "/b.bin")
        await client.sync(wait=True, deadline=30)
        # Nothing comes back after the delete, and the rename moved the written bytes.
        assert not (ufs / "gone.bin").exists() and not (ufs / "a.bin").exists()
        assert (ufs / "b.bin").read_bytes() == data


async def test_quota_full_is_no_space_and_nothing_lost(tmp_path: Path) -> None:
    ufs = tmp_path / "ufs"
    with _worker(tmp_path, bandwidth="256KiB", quota="1MiB") as w:
        async with CacheClient(w.endpoint, config=DepotConfig()) as client:
            first = os.urandom(700_000)
            await client.write("/one.bin", first)
            with pytest.raises(NoSpace) as info:
                await client.write("/two.bin", os.urandom(700_000))
            assert info.value.code == "NoSpace"
            with pytest.raises(NoSpace):
                await client.write("/big.bin", os.urandom(2 * 1024 * 1024))
            await client.sync(wait=True, deadline=30)
            assert (ufs / "one.bin").read_bytes() == first
            assert not (ufs / "two.bin").exists() and not (ufs / "big.bin").exists()
            # Space is back once the upload freed it.
            await client.write("/two.bin", b"fits now")
            await client.sync("/two.bin", wait=True, deadline=30)
            assert (ufs / "two.bin").read_bytes() == b"fits now"


def test_restart_uploads_acknowledged_writes(tmp_path: Path) -> None:
    """A stopped worker (graceful stop: uploads cancelled) uploads its staged writes after start."""
    ufs = tmp_path / "ufs"
    data = os.urandom(3 * 1024 * 1024)
    w = _worker(tmp_path, bandwidth="256KiB").start()
    try:
        import asyncio

        async def write() -> None:
            async with CacheClient(w.endpoint, config=DepotConfig()) as client:
                await client.write("/r.bin", data)

        asyncio.run(write())
    finally:
        w.stop()
    assert not (ufs / "r.bin").exists()
    with _worker(tmp_path, bandwidth="1MiB") as w2:  # the upload takes about 2 s

        async def check() -> None:
            async with CacheClient(w2.endpoint, config=DepotConfig()) as client:
                assert bytes(await client.read_range("/r.bin", 0, len(data))) == data
                await client.sync(wait=True, deadline=30)

        asyncio.run(check())
    assert (ufs / "r.bin").read_bytes() == data


def test_cli_sync(slow_worker: LocalWorker, tmp_path: Path) -> None:
    import asyncio

    data = os.urandom(200_000)

    async def write() -> None:
        async with CacheClient(slow_worker.endpoint, config=DepotConfig()) as client:
            await client.write("/c.bin", data)

    asyncio.run(write())
    runner = CliRunner()
    env = {"DEPOT_ENDPOINT": slow_worker.endpoint, "DEPOT_CONFIG": ""}
    result = runner.invoke(cli, ["sync", "/c.bin", "--wait", "--json"], env=env)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["synced"] is True and doc["dirty_bytes"] == 0
    assert (tmp_path / "ufs" / "c.bin").read_bytes() == data
    result = runner.invoke(cli, ["sync"], env=env)
    assert result.exit_code == 0 and "synced" in result.output
    result = runner.invoke(cli, ["status", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["workers"][0]["dirty_bytes"] == 0


@pytest.mark.timeout(90)
def test_kill_9_rounds(tmp_path: Path) -> None:
    """20 rounds: concurrent writes, kill -9 at a random moment (mid-write, mid-upload: the
    upload bandwidth is limited), restart on the same cache dir, sync, verify."""
    h = writeback_crash.run(tmp_path, iterations=20, seed=7)
    assert h.violations == [], h.violations[:5]
    assert h.kills >= 10 and h.acknowledged > 0
    assert h.recovered > 0  # some kills left acknowledged writes for the restart to upload
    assert h.observations > 0
