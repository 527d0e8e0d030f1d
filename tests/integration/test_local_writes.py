"""Local writes (docs/writes.md): write-back writes to a worker on this node are staged by the
client itself in the worker's staging file, then committed; the HTTP write stays the path for
other mounts, other nodes and clients that turn it off. Bad commits and abandoned slots never
acknowledge anything."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from depot.client import CacheClient
from depot.client.fs import DepotFileSystem
from depot.core.config import DepotConfig, load_config
from depot.core.errors import NoSpace
from depot.testing.local import LocalWorker

PAGE = 64 * 1024
SLOW = "1MiB"  # upload bandwidth: what a test writes stays staged for a while


def _worker(tmp_path: Path, **writeback: Any) -> LocalWorker:
    for name in ("ufs", "plain"):
        (tmp_path / name).mkdir(exist_ok=True)
    mounts = [
        {"path": "/", "ufs": (tmp_path / "ufs").as_uri(), "write_mode": "write-back"},
        {"path": "/plain", "ufs": (tmp_path / "plain").as_uri(), "write_mode": "through"},
    ]
    return LocalWorker(
        None, tmp_path / "cache", page_size=PAGE, mounts=mounts,
        extra={"writeback": {"bandwidth": SLOW, **writeback}},
    )


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[LocalWorker]:
    with _worker(tmp_path) as w:
        yield w


def _staging(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "writeback" / "staging"


def _post(endpoint: str, target: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(endpoint + target, method="POST", data=b"")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        error: dict[str, Any] = json.loads(exc.read())["error"]
        return exc.code, error


def _stats(endpoint: str) -> dict[str, Any]:
    with urllib.request.urlopen(endpoint + "/api/v1/cache/stats", timeout=30) as response:
        doc: dict[str, Any] = json.loads(response.read())
        return doc


def _client_config(**client: Any) -> DepotConfig:
    return load_config(environ={}, overrides={"client": client} if client else {})


async def test_client_writes_are_staged_locally(worker: LocalWorker, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    other = tmp_path / "src.bin"
    other.write_bytes(os.urandom(700_001))
    async with CacheClient(worker.endpoint, config=DepotConfig()) as client:
        status = await client.write("/ckpt/a.bin", data)
        assert status.size == len(data) and (status.etag or "").startswith("wb-")
        with open(other, "rb") as f:
            f.seek(1)  # read from the file's position, like a write over HTTP
            await client.write("/ckpt/b.bin", f)

        async def chunks() -> Any:
            for piece in (b"abc", b"", b"defgh"):
                yield piece

        await client.write("/ckpt/c.bin", chunks())
        stats = _stats(worker.endpoint)
        assert stats["writes"]["local_writes"] == 3
        # Read-your-writes before the upload, then the upload lands byte-identical.
        assert bytes(await client.read_range("/ckpt/a.bin", 0, len(data))) == data
        await client.sync(wait=True, deadline=60)
    ufs = tmp_path / "ufs" / "ckpt"
    assert (ufs / "a.bin").read_bytes() == data
    assert (ufs / "b.bin").read_bytes() == other.read_bytes()[1:]
    assert (ufs / "c.bin").read_bytes() == b"abcdefgh"
    assert os.listdir(_staging(tmp_path)) == []


def test_fsspec_open_wb_is_a_local_write(worker: LocalWorker, tmp_path: Path) -> None:
    fs = DepotFileSystem(endpoint=worker.endpoint, config=DepotConfig(), skip_instance_cache=True)
    parts = [os.urandom(n) for n in (10, 2 * 1024 * 1024, 1, 333_333)]
    with fs.open("/ckpt/model.safetensors", "wb") as f:
        for part in parts:
            f.write(part)
        assert f.tell() == sum(map(len, parts))
        # Until close nothing is acknowledged: the path does not exist yet.
        assert not fs.exists("/ckpt/model.safetensors")
    content = b"".join(parts)
    assert fs.cat_file("/ckpt/model.safetensors") == content
    fs.pipe_file("/ckpt/small.json", b"{}")  # small: one HTTP request beats the slot's two
    fs.pipe_file("/ckpt/large.bin", content)
    writes = _stats(worker.endpoint)["writes"]
    assert writes["local_writes"] == 2 and writes["writes"] == 3
    assert fs.cat_file("/ckpt/small.json") == b"{}" and fs.cat_file("/ckpt/large.bin") == content
    # An exception inside ``with``: nothing is written, the slot and its file are gone.
    with pytest.raises(RuntimeError), fs.open("/ckpt/model.safetensors", "wb") as f:
        f.write(b"half a checkpoint")
        raise RuntimeError("training crashed")
    assert fs.cat_file("/ckpt/model.safetensors") == content
    async def sync() -> None:
        await fs.client().sync(wait=True, deadline=60)

    fs._run(sync())
    assert (tmp_path / "ufs" / "ckpt" / "model.safetensors").read_bytes() == content
    assert os.listdir(_staging(tmp_path)) == []


async def test_http_write_where_local_writes_do_not_apply(
    worker: LocalWorker, tmp_path: Path
) -> None:
    async with CacheClient(worker.endpoint, config=_client_config(local_writes=False)) as client:
        await client.write("/off.bin", b"over http")
    async with CacheClient(worker.endpoint, config=_client_config(short_circuit=False)) as client:
        await client.write("/off2.bin", b"over http too")
    async with CacheClient(worker.endpoint, config=DepotConfig()) as client:
        await client.write("/plain/t.bin", b"through mode")  # not a write-back mount
        assert (tmp_path / "plain" / "t.bin").read_bytes() == b"through mode"
        assert bytes(await client.read_range("/off.bin", 0, 9)) == b"over http"
    stats = _stats(worker.endpoint)["writes"]
    assert stats["local_writes"] == 0 and stats["writes"] == 3


def test_bad_commits_acknowledge_nothing(worker: LocalWorker, tmp_path: Path) -> None:
    ep = worker.endpoint
    status, slot = _post(ep, "/api/v1/write/open?path=/x.bin")
    assert status == 200 and Path(slot["file"]).parent == _staging(tmp_path)
    Path(slot["file"]).write_bytes(b"12345")
    good = xxhash.xxh3_64_hexdigest(b"12345")
    token = slot["token"]
    # Malformed requests: 400, and the slot is still there to commit.
    for target in (
        f"/api/v1/write/commit?path=/x.bin&token={token}&checksum={good}",  # no size
        f"/api/v1/write/commit?path=/x.bin&token={token}&size=5&checksum=xyz",
        f"/api/v1/write/commit?path=/x.bin&token=../../etc&size=5&checksum={good}",
        f"/api/v1/write/commit?path=/x.bin&token={token}&size=-1&checksum={good}",
        f"/api/v1/write/commit?token={token}&size=5&checksum={good}",
    ):
        status, body = _post(ep, target)
        assert status == 400 and body["code"] == "InvalidArgument", (target, body)
    # Another path's commit cannot take this slot.
    status, body = _post(ep, f"/api/v1/write/commit?path=/y.bin&token={token}&size=5"
                             f"&checksum={good}")
    assert status == 404 and body["code"] == "NotFound"
    # A size that is not the file's: refused, and the slot and its file are dropped.
    status, body = _post(ep, f"/api/v1/write/commit?path=/x.bin&token={token}&size=6"
                             f"&checksum={good}")
    assert status == 400 and body["code"] == "InvalidArgument"
    assert not Path(slot["file"]).exists()
    status, body = _post(ep, f"/api/v1/write/commit?path=/x.bin&token={token}&size=5"
                             f"&checksum={good}")
    assert status == 404
    # Not a write-back mount, a directory: refused before any slot exists.
    status, body = _post(ep, "/api/v1/write/open?path=/plain/t.bin")
    assert status == 501 and body["code"] == "Unsupported"
    status, body = _post(ep, "/api/v1/write/open?path=/")
    assert status == 400 or body["code"] == "IsADirectory"
    status, body = _post(ep, "/api/v1/write/open?path=/../etc/passwd")
    assert status == 400 and body["code"] == "InvalidPath"
    status, body = _post(ep, f"/api/v1/write/abort?token={'0' * 32}")
    assert status == 200 and body["dropped"] is False
    stats = _stats(ep)
    assert stats["writes"]["local_writes"] == 0 and stats["writeback"]["queue_length"] == 0
    assert os.listdir(_staging(tmp_path)) == []
    assert not (tmp_path / "ufs" / "x.bin").exists()


def test_abort_and_expiry_drop_the_slot(tmp_path: Path) -> None:
    with _worker(tmp_path, local_write_ttl="0.2s") as w:
        status, slot = _post(w.endpoint, "/api/v1/write/open?path=/gone.bin")
        assert status == 200
        status, body = _post(w.endpoint, f"/api/v1/write/abort?token={slot['token']}")
        assert status == 200 and body["dropped"] is True
        assert not Path(slot["file"]).exists()
        # A slot past its time is dropped when the next one opens; its commit finds nothing.
        status, old = _post(w.endpoint, "/api/v1/write/open?path=/late.bin")
        Path(old["file"]).write_bytes(b"late")
        time.sleep(0.3)
        status, _ = _post(w.endpoint, "/api/v1/write/open?path=/other.bin")
        assert status == 200 and not Path(old["file"]).exists()
        checksum = xxhash.xxh3_64_hexdigest(b"late")
        status, body = _post(w.endpoint, f"/api/v1/write/commit?path=/late.bin"
                                         f"&token={old['token']}&size=4&checksum={checksum}")
        assert status == 404 and body["code"] == "NotFound"


async def test_quota_applies_to_local_writes(tmp_path: Path) -> None:
    with _worker(tmp_path, quota="1MiB", bandwidth="256KiB") as w:
        async with CacheClient(w.endpoint, config=DepotConfig()) as client:
            await client.write("/one.bin", os.urandom(700_000))
            with pytest.raises(NoSpace):  # known size: refused before a byte is written
                await client.write("/two.bin", os.urandom(700_000))
            # A size found only at commit (an async stream): refused at commit.
            async def stream() -> Any:
                yield os.urandom(700_000)

            with pytest.raises(NoSpace):
                await client.write("/three.bin", stream())
        assert _stats(w.endpoint)["writes"]["local_writes"] == 1
        staged = os.listdir(_staging(tmp_path))
        assert len(staged) <= 1  # only /one.bin's file, until its upload lands


async def test_a_slot_not_reachable_here_falls_back_to_http(
    worker: LocalWorker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A staging file this process cannot open (another node's disk, another user): the slot
    is given back and the write goes over HTTP."""
    import dataclasses

    from depot.client import client as client_module

    real = client_module.request_slot

    async def elsewhere(*args: Any, **kwargs: Any) -> Any:
        slot = await real(*args, **kwargs)
        return None if slot is None else dataclasses.replace(slot, file="/nonexistent/slot.data")

    monkeypatch.setattr(client_module, "request_slot", elsewhere)
    async with CacheClient(worker.endpoint, config=DepotConfig()) as client:
        await client.write("/fallback.bin", b"over http after all")
        assert bytes(await client.read_range("/fallback.bin", 0, 19)) == b"over http after all"
        await client.sync(wait=True, deadline=60)
    stats = _stats(worker.endpoint)["writes"]
    assert stats["local_writes"] == 0 and stats["writes"] == 1
    assert (tmp_path / "ufs" / "fallback.bin").read_bytes() == b"over http after all"
    assert os.listdir(_staging(tmp_path)) == []  # the given-back slot's file is gone too
