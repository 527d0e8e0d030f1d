"""Writes through a worker (docs/writes.md): through and cache-through, over a local directory and
over S3 (moto): round trips, overwrites, atomicity of interrupted uploads, delete/mkdir/rename,
the fsspec API and bad input."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from depot.client import CacheClient
from depot.client.fs import DepotFileSystem
from depot.core.config import DepotConfig
from depot.core.errors import InvalidPath, NotFound, ReadOnly
from depot.core.types import Attributes
from depot.testing.local import LocalWorker

from .conftest import MotoServer

PAGE = 64 * 1024
THRESHOLD = 1024 * 1024  # writes over this go up in parts


def _data(size: int, seed: int = 0) -> bytes:
    block = os.urandom(64 * 1024)
    return (block * (size // len(block) + 1))[:size]


@pytest.fixture(params=["file", "s3"])
def ufs(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """A writable mount at / (``through``) and a cache-through one at /ct, plus a read-only one."""
    if request.param == "file":
        for name in ("ufs", "ct", "ro"):
            (tmp_path / name).mkdir()
        (tmp_path / "ro" / "kept.txt").write_bytes(b"kept")
        return {
            "root": {"ufs": (tmp_path / "ufs").as_uri()},
            "ct": {"ufs": (tmp_path / "ct").as_uri()},
            "ro": {"ufs": (tmp_path / "ro").as_uri()},
            "local": tmp_path / "ufs",
        }
    moto: MotoServer = request.getfixturevalue("moto_server")
    bucket = moto.new_bucket()
    moto.client().put_object(Bucket=bucket, Key="ro/kept.txt", Body=b"kept")
    opts = {"options": moto.options}
    return {
        "root": {"ufs": f"s3://{bucket}/root", **opts},
        "ct": {"ufs": f"s3://{bucket}/ct", **opts},
        "ro": {"ufs": f"s3://{bucket}/ro", **opts},
        "local": None,
    }


@pytest.fixture
def worker(ufs: dict[str, Any], tmp_path: Path) -> Iterator[LocalWorker]:
    mounts = [
        {"path": "/", **ufs["root"]},
        {"path": "/ct", "write_mode": "cache-through", **ufs["ct"]},
        {"path": "/ro", "read_only": True, **ufs["ro"]},
    ]
    with LocalWorker(
        None, tmp_path / "cache", page_size=PAGE, mounts=mounts,
        extra={"worker": {"write_multipart_threshold": THRESHOLD, "max_write_bytes": "64MiB"}},
    ) as w:
        yield w


async def _stats(client: CacheClient) -> dict[str, Any]:
    return await client.cache_stats()


@pytest.mark.parametrize("size", [10, 3 * PAGE + 17, 6 * 1024 * 1024 + 5])
async def test_write_read_back_and_overwrite(worker: LocalWorker, size: int) -> None:
    async with CacheClient(worker.endpoint, config=DepotConfig()) as client:
        data = _data(size)
        status = await client.write("/dir/f.bin", data)
        assert status.size == size
        assert await client.read_range("/dir/f.bin", 0) == data
        assert (await client.stat("/dir/f.bin")).size == size
        assert [e.path for e in await client.list("/dir")] == ["/dir/f.bin"]
        newer = _data(size // 2 + 1)
        await client.write("/dir/f.bin", newer)
        assert await client.read_range("/dir/f.bin", 0) == newer  # never the stale bytes
        assert (await client.stat("/dir/f.bin")).size == len(newer)
        stats = await _stats(client)
        assert stats["writes"]["writes"] == 2
        if size > THRESHOLD:
            assert stats["writes"]["multipart_writes"] >= 1


async def test_write_modes(worker: LocalWorker) -> None:
    async with CacheClient(worker.endpoint, config=DepotConfig()) as client:
        data = _data(5 * PAGE + 100)
        await client.write("/through.bin", data)  # mode "through": nothing cached
        assert (await _stats(client))["pages"] == 0
        await client.write("/ct/small.bin", data)
        big = _data(THRESHOLD + 3 * PAGE + 1)
        await client.write("/ct/big.bin", big)  # multipart, pages staged while streaming
        before = await _stats(client)
        assert before["writes"]["pages_cached"] == 6 + 20
        assert await client.read_range("/ct/small.bin", 0) == data
        assert await client.read_range("/ct/big.bin", 0) == big
        after = await _stats(client)
        assert after["ufs_reads"] == before["ufs_reads"]  # all hits: no UFS read
        assert after["misses"] == before["misses"]


async def test_read_only_mount_and_bad_paths(worker: LocalWorker) -> None:
    async with CacheClient(worker.endpoint, config=DepotConfig()) as client:
        with pytest.raises(ReadOnly):
            await client.write("/ro/new.txt", b"x")
        with pytest.raises(ReadOnly):
            await client.delete("/ro/kept.txt")
        with pytest.raises(ReadOnly):
            await client.rename("/ro/kept.txt", "/ro/moved.txt")
        assert await client.read_range("/ro/kept.txt", 0) == b"kept"
        with pytest.raises(InvalidPath):
            await client.write("/a/../../etc/x", b"x")
        with pytest.raises(NotFound):
            await client.delete("/nope.txt")
        # the connection is still usable after refused writes
        await client.write("/ok.txt", b"ok")
        assert await client.read_range("/ok.txt", 0) == b"ok"


async def test_delete_mkdir_rename(worker: LocalWorker) -> None:
    async with CacheClient(worker.endpoint, config=DepotConfig()) as client:
        await client.mkdir("/d")
        await client.write("/d/a.txt", b"alpha")
        assert [e.path for e in await client.list("/d")] == ["/d/a.txt"]
        moved = await client.rename("/d/a.txt", "/d/b.txt")
        assert moved.path == "/d/b.txt" and moved.size == 5
        assert await client.read_range("/d/b.txt", 0) == b"alpha"
        with pytest.raises(NotFound):
            await client.stat("/d/a.txt")
        assert [e.path for e in await client.list("/d")] == ["/d/b.txt"]
        big = _data(THRESHOLD + 12345)
        await client.write("/d/big.bin", big)
        await client.rename("/d/big.bin", "/e/big.bin")  # multipart copy
        assert await client.read_range("/e/big.bin", 0) == big
        await client.delete("/d/b.txt")
        with pytest.raises(NotFound):
            await client.stat("/d/b.txt")
        with pytest.raises(FileExistsError):
            await client.mkdir("/e/big.bin")


async def test_interrupted_upload_leaves_the_old_version(
    worker: LocalWorker, ufs: dict[str, Any]
) -> None:
    async with CacheClient(worker.endpoint, config=DepotConfig()) as client:
        old = b"old version"
        await client.write("/v.bin", old)
        host, port = worker.endpoint.rsplit("//", 1)[1].split(":")
        for size in (1000, THRESHOLD * 3):  # one put, and a multipart upload
            _reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                f"PUT /api/v1/write?path=%2Fv.bin HTTP/1.1\r\nHost: x\r\n"
                f"Content-Length: {size}\r\n\r\n".encode()
            )
            writer.write(_data(size * 2 // 3))
            await writer.drain()
            await asyncio.sleep(0.3)
            writer.close()  # mid-body
            await asyncio.sleep(0.3)
            assert await client.read_range("/v.bin", 0) == old
            assert (await client.stat("/v.bin")).size == len(old)
        assert (await _stats(client))["writes"]["failed"] == 2
    if ufs["local"] is not None:
        assert sorted(p.name for p in ufs["local"].iterdir()) == ["v.bin"]


def _raw(endpoint: str, head: str, body: bytes = b"") -> tuple[int, bytes]:
    host, port = endpoint.rsplit("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        first = data.split(b"\r\n", 1)[0]
        return int(first.split()[1]), data


def test_bad_requests(worker: LocalWorker) -> None:
    status, _ = _raw(worker.endpoint, "PUT /api/v1/write?path=%2Fx HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 411
    status, data = _raw(
        worker.endpoint,
        "PUT /api/v1/write?path=%2Fx HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n",
    )
    assert status == 413 and b"over the limit" in data
    status, _ = _raw(
        worker.endpoint,
        "PUT /api/v1/write?path=%2Fx HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        "Expect: 100-continue\r\n\r\n",
    )
    assert status == 100  # then the body may be sent
    status, _ = _raw(worker.endpoint, "PUT /api/v1/read?path=%2Fx HTTP/1.1\r\nHost: x\r\n"
                     "Content-Length: 0\r\n\r\n")
    assert status == 405
    for bad in ("{not json", '{"headers": {"X-Not-A-Content-Header": "v"}}', '{"metadata": 1}'):
        status, data = _raw(
            worker.endpoint,
            "PUT /api/v1/write?path=%2Fbad HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
            f"X-Depot-Attributes: {bad}\r\n\r\n",
            b"x",
        )
        assert status == 400 and b"x-depot-attributes" in data
    status, _ = _raw(worker.endpoint, "GET /api/v1/stat?path=%2F&attributes=maybe HTTP/1.1\r\n"
                     "Host: x\r\n\r\n")
    assert status == 400


ATTRS = Attributes.of(
    {"Content-Type": "text/csv", "Cache-Control": "max-age=60", "Content-Disposition": "inline"},
    {"owner": "team-a", "note": "=?UTF-8?B?w6k=?="},
)


@pytest.mark.parametrize("size", [10, THRESHOLD + 12345])
async def test_write_attributes(worker: LocalWorker, ufs: dict[str, Any], size: int) -> None:
    """Attributes go with the object in every write mode and size (where the store keeps
    them: S3 does, a local directory does not), and a rename keeps them."""
    kept = ufs["local"] is None
    data = _data(size)
    async with CacheClient(worker.endpoint, config=DepotConfig()) as client:
        for path in ("/attr/through.csv", "/ct/attr/cached.csv"):
            status = await client.write(path, data, attributes=ATTRS)
            assert status.attributes == (ATTRS if kept else None)
            stat = await client.stat(path, attributes=True)
            got = stat.attributes
            if kept:
                assert got is not None and dict(got.metadata) == dict(ATTRS.metadata)
                assert got.content_type == "text/csv" and got.header("Cache-Control") == "max-age=60"
            else:
                assert got is None
            assert await client.read_range(path, 0) == data
        moved = await client.rename("/attr/through.csv", "/attr/moved.csv")
        assert moved.attributes == (ATTRS if kept else None)
        await client.write("/attr/moved.csv", b"plain")  # an overwrite drops them
        got = (await client.stat("/attr/moved.csv", attributes=True)).attributes
        assert got is None or (got.metadata == () and got.content_type != "text/csv")


async def test_attributes_of_a_listed_object_are_looked_up_once(
    worker: LocalWorker, ufs: dict[str, Any], moto_server: MotoServer
) -> None:
    """An object first seen in a listing (which carries no attributes): a plain stat is served
    from the listing, a stat asking for attributes heads the object once, later ones hit."""
    if ufs["local"] is not None:
        pytest.skip("a local directory keeps no attributes")
    bucket = ufs["root"]["ufs"].split("/")[2]
    moto_server.client().put_object(
        Bucket=bucket, Key="root/ext/o.txt", Body=b"external", ContentType="text/x-ext",
        Metadata={"Origin": "boto3"},
    )
    async with CacheClient(worker.endpoint, config=DepotConfig()) as client:
        assert [e.attributes for e in await client.list("/ext")] == [None]
        before = await _stats(client)
        assert (await client.stat("/ext/o.txt")).attributes is None
        got = (await client.stat("/ext/o.txt", attributes=True)).attributes
        assert got is not None and got.content_type == "text/x-ext"
        assert dict(got.metadata) == {"origin": "boto3"}
        again = await client.stat("/ext/o.txt", attributes=True)
        assert again.attributes == got
        after = await _stats(client)
        assert after["metadata"]["revalidations"] - before["metadata"]["revalidations"] == 1


async def test_write_from_file_and_stream(worker: LocalWorker, tmp_path: Path) -> None:
    data = _data(2 * THRESHOLD + 7)
    local = tmp_path / "local.bin"
    local.write_bytes(data)

    async def stream() -> AsyncIterator[bytes]:
        for pos in range(0, len(data), 100_000):
            yield data[pos : pos + 100_000]

    async with CacheClient(worker.endpoint, config=DepotConfig()) as client:
        with open(local, "rb") as f:
            await client.write("/from-file.bin", f)
        assert await client.read_range("/from-file.bin", 0) == data
        await client.write("/from-stream.bin", stream())
        assert await client.read_range("/from-stream.bin", 0) == data


def test_fsspec_writes(worker: LocalWorker, tmp_path: Path) -> None:
    fs = DepotFileSystem(endpoint=worker.endpoint, config=DepotConfig(), skip_instance_cache=True)
    try:
        with fs.open("depot://w/a.bin", "wb") as f:
            f.write(b"hello ")
            f.write(b"world")
        assert fs.cat("/w/a.bin") == b"hello world"
        assert fs.info("/w/a.bin")["size"] == 11
        fs.pipe_file("/w/b.bin", b"piped")
        local = tmp_path / "up.bin"
        local.write_bytes(b"uploaded")
        fs.put_file(str(local), "/w/c.bin")
        assert sorted(fs.ls("/w", detail=False)) == ["/w/a.bin", "/w/b.bin", "/w/c.bin"]
        fs.mv("/w/b.bin", "/w/moved.bin")
        assert fs.cat("/w/moved.bin") == b"piped" and not fs.exists("/w/b.bin")
        fs.rm("/w/c.bin")
        assert not fs.exists("/w/c.bin")
        fs.mkdir("/w/sub")
        fs.makedirs("/w/sub2", exist_ok=True)
        # a failure inside ``with`` uploads nothing
        with pytest.raises(RuntimeError), fs.open("/w/a.bin", "wb") as f:
            f.write(b"partial")
            raise RuntimeError("boom")
        assert fs.cat("/w/a.bin") == b"hello world"
        fs.rm("/w", recursive=True)
        assert not fs.exists("/w/a.bin")
    finally:
        fs.close()


def test_pandas_to_parquet_round_trip(worker: LocalWorker) -> None:
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    frame = pd.DataFrame({"id": range(5000), "name": [f"n{i}" for i in range(5000)]})
    options = {"endpoint": worker.endpoint, "config": DepotConfig()}
    frame.to_parquet("depot://tables/t.parquet", storage_options=options)
    back = pd.read_parquet("depot://tables/t.parquet", storage_options=options)
    pd.testing.assert_frame_equal(frame, back)
