"""The emulated object store of the benchmarks (``bench/ufs_server.py``) takes writes as S3 does:
obstore's S3Store puts, multipart uploads, aborts and deletes against it, and a write-back
worker uploads through it. The write-path benchmarks rely on these semantics."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import obstore
import pytest
from obstore.exceptions import AlreadyExistsError
from obstore.store import S3Store

from depot.client import CacheClient
from depot.client.fs import DepotFileSystem
from depot.core.config import DepotConfig
from depot.testing.local import LocalWorker

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


@dataclass
class Emulated:
    endpoint: str
    root: Path

    def store(self, bucket: str = "bucket") -> S3Store:
        return S3Store(bucket, endpoint=self.endpoint, skip_signature=True, region="us-east-1",
                       client_options={"allow_http": True}, virtual_hosted_style_request=False)

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(self.endpoint + "/__stats") as answer:
            result: dict[str, int] = json.loads(answer.read())
            return result

    def conn(self) -> http.client.HTTPConnection:
        host, port = self.endpoint.removeprefix("http://").split(":")
        return http.client.HTTPConnection(host, int(port), timeout=30)


@contextlib.contextmanager
def emulated_store(root: Path, *flags: str) -> Iterator[Emulated]:
    (root / "bucket").mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "ufs_server.py"), str(root), *flags],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, line
        yield Emulated(line.rsplit(" ", 1)[-1].strip(), root)
    finally:
        proc.terminate()
        proc.wait(30)
    # Uploads in progress and temp files go with the server.
    assert not (root / ".ufs-server").exists()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Emulated]:
    with emulated_store(tmp_path / "s3", "--first-byte-ms", "1", "--rate-per-conn", "0") as s:
        yield s


def _keys(store: S3Store) -> list[str]:
    return sorted(m["path"] for m in obstore.list(store).collect())


def _s3_etag(parts: list[bytes]) -> str:
    if len(parts) == 1:
        return f'"{hashlib.md5(parts[0]).hexdigest()}"'
    digests = b"".join(hashlib.md5(p).digest() for p in parts)
    return f'"{hashlib.md5(digests).hexdigest()}-{len(parts)}"'


def test_put_multipart_read_list_delete(store: Emulated) -> None:
    s3 = store.store()
    small = os.urandom(1000)
    big = os.urandom(12 * MiB + 7)
    assert obstore.put(s3, "dir/small.bin", small)["e_tag"] == _s3_etag([small])
    put = obstore.put(s3, "dir/sub/big.bin", big, use_multipart=True, chunk_size=5 * MiB)
    expected = _s3_etag([big[:5 * MiB], big[5 * MiB:10 * MiB], big[10 * MiB:]])
    assert put["e_tag"] == expected
    assert bytes(obstore.get(s3, "dir/small.bin").bytes()) == small
    assert bytes(obstore.get(s3, "dir/sub/big.bin").bytes()) == big
    assert bytes(obstore.get_range(s3, "dir/sub/big.bin", start=5 * MiB - 3, end=5 * MiB + 3)) == \
        big[5 * MiB - 3:5 * MiB + 3]
    head = obstore.head(s3, "dir/sub/big.bin")
    assert head["size"] == len(big) and head["e_tag"] == expected
    assert (store.root / "bucket" / "dir" / "sub" / "big.bin").read_bytes() == big
    assert _keys(s3) == ["dir/small.bin", "dir/sub/big.bin"]
    listed = {m["path"]: m for m in obstore.list(s3).collect()}
    assert listed["dir/sub/big.bin"]["e_tag"] == expected
    stats = store.stats()
    assert stats["puts"] == 4 and stats["multipart_completed"] == 1
    assert stats["bytes_received"] == len(small) + len(big)

    # An overwrite replaces the object (and its ETag) whole.
    assert obstore.put(s3, "dir/small.bin", b"new")["e_tag"] == _s3_etag([b"new"])
    assert bytes(obstore.get(s3, "dir/small.bin").bytes()) == b"new"

    obstore.delete(s3, "dir/small.bin")  # obstore sends DeleteObjects
    obstore.delete(s3, "dir/sub/big.bin")
    obstore.delete(s3, "dir/never-there.bin")
    assert _keys(s3) == []
    assert list((store.root / "bucket").iterdir()) == []  # emptied directories go too
    with pytest.raises(FileNotFoundError):
        obstore.head(s3, "dir/small.bin")
    assert store.stats()["deletes"] == 2


async def test_aborted_multipart_leaves_nothing(store: Emulated) -> None:
    s3 = store.store()
    obstore.put(s3, "keep.bin", b"old")

    async def failing() -> AsyncIterator[bytes]:
        yield os.urandom(5 * MiB)
        yield os.urandom(5 * MiB)
        raise ValueError("producer failed")

    with pytest.raises(ValueError, match="producer failed"):
        await obstore.put_async(s3, "keep.bin", failing(), chunk_size=5 * MiB)
    assert store.stats()["multipart_aborted"] == 1
    assert bytes(obstore.get(s3, "keep.bin").bytes()) == b"old"
    assert _keys(s3) == ["keep.bin"]
    assert list((store.root / ".ufs-server").glob("*/uploads/*")) == []


def test_multipart_by_hand_visibility_and_abort(store: Emulated) -> None:
    """An upload in progress is invisible; after an abort its parts and its id are gone."""
    conn = store.conn()

    def call(method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
        conn.request(method, target, body=body)
        answer = conn.getresponse()
        return answer.status, answer.read()

    status, xml = call("POST", "/bucket/mp.bin?uploads=")
    assert status == 200
    upload_id = xml.split(b"<UploadId>")[1].split(b"</UploadId>")[0].decode()
    first, last = os.urandom(1000), b"tail"
    for number, part in ((1, first), (2, last)):
        status, _ = call("PUT", f"/bucket/mp.bin?partNumber={number}&uploadId={upload_id}", part)
        assert status == 200
    assert call("HEAD", "/bucket/mp.bin")[0] == 404
    assert b"<KeyCount>0</KeyCount>" in call("GET", "/bucket?list-type=2")[1]

    def complete(*parts: tuple[int, bytes]) -> tuple[int, bytes]:
        listed = "".join(f'<Part><PartNumber>{n}</PartNumber><ETag>"{hashlib.md5(p).hexdigest()}"'
                         f"</ETag></Part>" for n, p in parts)
        body = f"<CompleteMultipartUpload>{listed}</CompleteMultipartUpload>".encode()
        return call("POST", f"/bucket/mp.bin?uploadId={upload_id}", body)

    # Refused as S3 refuses them: a part under 5 MiB that is not the last, parts out of order,
    # a part never uploaded. The upload stays open after each.
    assert b"EntityTooSmall" in complete((1, first), (2, last))[1]
    assert b"InvalidPartOrder" in complete((2, last), (1, first))[1]
    assert b"InvalidPart<" in complete((1, first), (3, last))[1]
    assert call("HEAD", "/bucket/mp.bin")[0] == 404
    assert call("DELETE", f"/bucket/mp.bin?uploadId={upload_id}")[0] == 204
    status, xml = call("PUT", f"/bucket/mp.bin?partNumber=2&uploadId={upload_id}", b"late")
    assert status == 404 and b"NoSuchUpload" in xml
    assert call("DELETE", f"/bucket/mp.bin?uploadId={upload_id}")[0] == 404
    assert call("HEAD", "/bucket/mp.bin")[0] == 404
    assert list((store.root / "bucket").iterdir()) == []


def test_multipart_uneven_parts_skipped_numbers_and_reupload(store: Emulated) -> None:
    """Parts of different sizes, a part sent twice, numbers left out: the object is the listed
    parts' bytes end to end, whatever order they arrived in."""
    conn = store.conn()

    def call(method: str, target: str, body: bytes = b"") -> tuple[int, bytes, str | None]:
        conn.request(method, target, body=body)
        answer = conn.getresponse()
        return answer.status, answer.read(), answer.getheader("ETag")

    def upload(key: str, parts: list[tuple[int, bytes]], listed: list[int]) -> bytes:
        xml = call("POST", f"/bucket/{key}?uploads=")[1]
        upload_id = xml.split(b"<UploadId>")[1].split(b"</UploadId>")[0].decode()
        etags = {}
        for number, data in parts:
            status, _, etag = call("PUT", f"/bucket/{key}?partNumber={number}&uploadId={upload_id}", data)
            assert status == 200 and etag == _s3_etag([data])
            etags[number] = etag
        body = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{etags[n]}</ETag></Part>" for n in listed)
        status, xml, _ = call("POST", f"/bucket/{key}?uploadId={upload_id}",
                              f"<CompleteMultipartUpload>{body}</CompleteMultipartUpload>".encode())
        assert status == 200, xml
        return xml

    a, b, c = os.urandom(6 * MiB), os.urandom(5 * MiB + 1), os.urandom(10)
    # The last part first; part 2 sent twice (the second one counts); a middle part of another size.
    xml = upload("uneven.bin", [(3, c), (1, a), (2, a), (2, b)], [1, 2, 3])
    want = _s3_etag([a, b, c])
    assert want.strip('"').encode() in xml
    assert (store.root / "bucket" / "uneven.bin").read_bytes() == a + b + c
    # Parts 1 and 3 of three uploaded: the object is those two.
    upload("skipped.bin", [(1, a), (2, a), (3, c)], [1, 3])
    assert (store.root / "bucket" / "skipped.bin").read_bytes() == a + c
    # Uniform parts, part 3 of 3 not listed: cut after part 2.
    upload("cut.bin", [(1, a), (2, a), (3, a)], [1, 2])
    assert (store.root / "bucket" / "cut.bin").read_bytes() == a + a
    assert obstore.head(store.store(), "cut.bin")["e_tag"] == _s3_etag([a, a])
    assert _keys(store.store()) == ["cut.bin", "skipped.bin", "uneven.bin"]
    assert list((store.root / ".ufs-server").glob("*/uploads/*")) == []


def test_chunked_body_expect_continue_and_conditions(store: Emulated) -> None:
    conn = store.conn()
    data = os.urandom(3 * MiB + 5)
    conn.request("PUT", "/bucket/chunked.bin", body=iter([data[:MiB], data[MiB:]]),
                 encode_chunked=True, headers={"Expect": "100-continue"})
    answer = conn.getresponse()
    answer.read()
    assert answer.status == 200 and answer.getheader("ETag") == _s3_etag([data])
    assert (store.root / "bucket" / "chunked.bin").read_bytes() == data
    # A wrong Content-MD5 stores nothing; the connection stays usable.
    conn.request("PUT", "/bucket/bad.bin", body=b"abc", headers={"Content-MD5": "AAAAAAAAAAAAAAAAAAAAAA=="})
    answer = conn.getresponse()
    assert answer.status == 400 and b"BadDigest" in answer.read()
    assert not (store.root / "bucket" / "bad.bin").exists()
    s3 = store.store()
    with pytest.raises(AlreadyExistsError):
        obstore.put(s3, "chunked.bin", b"x", mode="create")
    assert bytes(obstore.get(s3, "chunked.bin").bytes()) == data


def test_xxh3_etags_have_the_shape_of_s3s(tmp_path: Path) -> None:
    import xxhash

    with emulated_store(tmp_path / "x", "--first-byte-ms", "0", "--rate-per-conn", "0",
                        "--etag", "xxh3") as fast:
        s3 = fast.store()
        data = os.urandom(11 * MiB)
        one = obstore.put(s3, "one.bin", data, use_multipart=False)
        assert one["e_tag"] == f'"{xxhash.xxh3_128_hexdigest(data)}"'
        parts = [data[:5 * MiB], data[5 * MiB:10 * MiB], data[10 * MiB:]]
        digests = b"".join(xxhash.xxh3_128_digest(p) for p in parts)
        want = f'"{xxhash.xxh3_128_hexdigest(digests)}-3"'
        assert obstore.put(s3, "mp.bin", data, use_multipart=True, chunk_size=5 * MiB)["e_tag"] == want
        assert obstore.head(s3, "mp.bin")["e_tag"] == want
        assert bytes(obstore.get(s3, "mp.bin").bytes()) == data
        # Content-MD5 is still checked.
        conn = fast.conn()
        conn.request("PUT", "/bucket/bad.bin", body=b"abc", headers={"Content-MD5": "AAAAAAAAAAAAAAAAAAAAAA=="})
        assert conn.getresponse().status == 400


def test_put_is_paced_and_answers_after_first_byte(tmp_path: Path) -> None:
    with emulated_store(tmp_path / "slow", "--first-byte-ms", "100", "--rate-per-conn", "20MB") as slow:
        s3 = slow.store()
        obstore.put(s3, "warm.bin", b"x")  # connection up
        data = os.urandom(4_000_000)
        t0 = time.perf_counter()
        obstore.put(s3, "paced.bin", data)
        elapsed = time.perf_counter() - t0
        # 4 MB at 20 MB/s is 0.2 s, then 0.1 s before the answer.
        assert elapsed >= 0.27, elapsed
        assert bytes(obstore.get(s3, "paced.bin").bytes()) == data


def test_stats_count_the_gets_under_way(tmp_path: Path) -> None:
    """``active_gets`` counts body-carrying GETs from their start (the first-byte wait) to their
    last byte, and is back at 0 once they end, a HEAD not among them."""
    with emulated_store(tmp_path / "slow", "--first-byte-ms", "400", "--rate-per-conn", "0") as slow:
        s3 = slow.store()
        obstore.put(s3, "a.bin", b"y" * 1000)
        assert slow.stats()["active_gets"] == 0
        with contextlib.ExitStack() as stack:
            conns = [stack.enter_context(contextlib.closing(slow.conn())) for _ in range(3)]
            for conn in conns[:2]:
                conn.request("GET", "/bucket/a.bin", headers={"Range": "bytes=0-99"})
            conns[2].request("HEAD", "/bucket/a.bin")
            time.sleep(0.15)
            assert slow.stats()["active_gets"] == 2
            bodies = [conn.getresponse().read() for conn in conns]
        assert bodies == [b"y" * 100, b"y" * 100, b""]
        assert slow.stats()["active_gets"] == 0


def test_depot_write_back_through_the_emulated_store(store: Emulated, tmp_path: Path) -> None:
    options = {"endpoint": store.endpoint, "region": "us-east-1", "skip_signature": "true",
               "path_style": "true"}
    mounts = [{"path": "/", "ufs": "s3://bucket/wb", "write_mode": "write-back", "options": options}]
    small = os.urandom(3 * MiB + 1)
    big = os.urandom(11 * MiB + 3)  # over the threshold below: a multipart upload of 3 parts
    with LocalWorker(None, tmp_path / "cache", page_size="1MiB", mounts=mounts,
                     extra={"writeback": {"multipart_threshold": "4MiB", "part_size": "5MiB"}}) as w:
        fs = DepotFileSystem(endpoint=w.endpoint, config=DepotConfig(), skip_instance_cache=True)
        with fs.open("/ckpt/small.bin", "wb") as f:
            f.write(small)
        with fs.open("/ckpt/big.bin", "wb") as f:
            f.write(big)

        async def sync() -> None:
            async with CacheClient(w.endpoint, config=DepotConfig()) as client:
                done = await client.sync(wait=True, deadline=60)
                assert done["synced"] is True

        asyncio.run(sync())
        objects = store.root / "bucket" / "wb" / "ckpt"
        assert (objects / "small.bin").read_bytes() == small
        assert (objects / "big.bin").read_bytes() == big
        assert obstore.head(store.store(), "wb/ckpt/big.bin")["e_tag"].endswith('-3"')
        assert fs.cat_file("/ckpt/big.bin") == big
    stats = store.stats()
    assert stats["multipart_completed"] == 1 and stats["multipart_aborted"] == 0


def _bench_suite() -> Any:
    """``bench/suite.py``, imported as the suite runs it (its folder on the path)."""
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    import suite

    return suite


def test_every_bare_reader_gets_the_whole_object(store: Emulated, tmp_path: Path) -> None:
    """The 8-reader figure's machine row (``bench/bare_pipeline.py``): a fetch into files and
    readers that take each page as it appears, the last one short."""
    suite = _bench_suite()
    data = os.urandom(9 * MiB + 123)
    (store.root / "bucket" / "model.bin").write_bytes(data)
    rounds = tmp_path / "rounds"
    rounds.mkdir()
    result = suite.run_bare(store.endpoint, rounds, "model.bin", 3, len(data), setup=0.0)
    assert len(result.seconds) == 3 and result.wall > 0
    assert list(rounds.iterdir()) == []  # a round's files go with it


def test_a_bare_round_fails_instead_of_waiting_for_pages_that_never_come(
    store: Emulated, tmp_path: Path
) -> None:
    suite = _bench_suite()
    data = os.urandom(5 * MiB)
    (store.root / "bucket" / "model.bin").write_bytes(data)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="failed"):
        suite.run_bare(store.endpoint, tmp_path, "model.bin", 2, len(data) + 8 * MiB, setup=0.0)
    assert time.monotonic() - t0 < 30
