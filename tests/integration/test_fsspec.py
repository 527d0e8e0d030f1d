"""``depot://`` through fsspec, pandas and pyarrow, against a real worker over a local-dir UFS."""

from __future__ import annotations

import io
import os
import pickle
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from depot.client import DepotFileSystem
from depot.core.config import DepotConfig, MountConfig
from depot.core.errors import StaleVersion, Unavailable, Unsupported
from depot.testing.local import LocalWorker

PAGE = 64 * 1024
BIG = bytes((i * 31 + (i >> 12)) % 256 for i in range(3 * 1024 * 1024 + 12345))


@pytest.fixture(scope="module")
def ufs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ufs")
    (root / "data" / "sub" / "deep").mkdir(parents=True)
    (root / "data" / "big.bin").write_bytes(BIG)
    (root / "data" / "small.txt").write_bytes(b"hello depot\n")
    (root / "data" / "empty").write_bytes(b"")
    (root / "data" / "lines.txt").write_bytes(b"".join(b"line %d\n" % i for i in range(5000)))
    (root / "data" / "sub" / "a.csv").write_bytes(b"x,y\n1,2\n3,4\n")
    (root / "data" / "sub" / "deep" / "b.json").write_bytes(b'{"k": 1}')
    table = pa.table({"id": list(range(20_000)), "name": [f"n{i}" for i in range(20_000)]})
    pq.write_table(table, root / "data" / "t.parquet", row_group_size=5000)
    return root


@pytest.fixture(scope="module")
def worker(ufs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalWorker]:
    cache = tmp_path_factory.mktemp("cache")
    with LocalWorker(
        ufs_uri=ufs.as_uri(), cache_dir=cache, page_size=PAGE, cache_size="256MiB"
    ) as w:
        yield w


@pytest.fixture
def fs(worker: LocalWorker) -> Iterator[DepotFileSystem]:
    filesystem = DepotFileSystem(
        endpoint=worker.endpoint, config=DepotConfig(), skip_instance_cache=True
    )
    yield filesystem
    filesystem.close()


# -- paths and metadata ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("depot://data/x", "/data/x"),
        ("depot:///data/x", "/data/x"),
        ("/data/x/", "/data/x"),
        ("data/x", "/data/x"),
        ("depot://", "/"),
        ("", "/"),
    ],
)
def test_strip_protocol(url: str, path: str) -> None:
    assert DepotFileSystem._strip_protocol(url) == path


def test_info_ls_exists(fs: DepotFileSystem) -> None:
    info = fs.info("depot://data/big.bin")
    assert info["name"] == "/data/big.bin" and info["size"] == len(BIG) and info["type"] == "file"
    assert info["etag"] and info["mtime"] > 0
    assert fs.info("/data/sub")["type"] == "directory"
    assert fs.info("/")["type"] == "directory"
    assert fs.ls("/data", detail=False) == [
        "/data/big.bin",
        "/data/empty",
        "/data/lines.txt",
        "/data/small.txt",
        "/data/sub",
        "/data/t.parquet",
    ]
    detailed = {e["name"]: e for e in fs.ls("depot://data/sub")}
    assert detailed["/data/sub/a.csv"]["size"] == 12
    assert detailed["/data/sub/deep"]["type"] == "directory"
    assert fs.ls("/data/small.txt", detail=False) == ["/data/small.txt"]
    assert fs.exists("/data/small.txt") and fs.isdir("/data/sub") and fs.isfile("/data/empty")
    assert not fs.exists("/data/nope") and not fs.isdir("/data/small.txt")
    assert fs.size("/data/big.bin") == len(BIG)
    assert fs.modified("/data/small.txt").timestamp() == pytest.approx(
        fs.info("/data/small.txt")["mtime"]
    )


def test_find_walk_glob(fs: DepotFileSystem) -> None:
    assert fs.find("/data/sub") == ["/data/sub/a.csv", "/data/sub/deep/b.json"]
    assert fs.find("depot://data/sub", withdirs=True) == [
        "/data/sub",
        "/data/sub/a.csv",
        "/data/sub/deep",
        "/data/sub/deep/b.json",
    ]
    assert fs.find("/data", maxdepth=1) == [
        "/data/big.bin",
        "/data/empty",
        "/data/lines.txt",
        "/data/small.txt",
        "/data/t.parquet",
    ]
    walked = list(fs.walk("/data/sub"))
    assert walked[0] == ("/data/sub", ["deep"], ["a.csv"])
    assert walked[1] == ("/data/sub/deep", [], ["b.json"])
    assert fs.glob("/data/*.txt") == ["/data/lines.txt", "/data/small.txt"]
    assert fs.glob("depot://data/**/*.json") == ["/data/sub/deep/b.json"]
    assert fs.du("/data/sub") == 12 + 8


def test_missing_paths_are_file_not_found(fs: DepotFileSystem) -> None:
    with pytest.raises(FileNotFoundError):
        fs.info("/data/missing")
    with pytest.raises(FileNotFoundError):
        fs.cat_file("/data/missing")
    with pytest.raises(FileNotFoundError):
        fs.open("/data/missing")
    with pytest.raises(FileNotFoundError):
        fs.ls("/data/missing")
    with pytest.raises(IsADirectoryError):
        fs.cat_file("/data/sub")
    with pytest.raises(IsADirectoryError):
        fs.open("/data/sub")


# -- whole and ranged reads --------------------------------------------------------------------------


def test_cat_file_ranges(fs: DepotFileSystem) -> None:
    assert fs.cat_file("/data/big.bin") == BIG
    assert fs.cat("depot://data/small.txt") == b"hello depot\n"
    assert fs.cat_file("/data/empty") == b""
    assert fs.cat_file("/data/big.bin", 100, 5000) == BIG[100:5000]
    assert fs.cat_file("/data/big.bin", PAGE - 3, 3 * PAGE + 7) == BIG[PAGE - 3 : 3 * PAGE + 7]
    assert fs.cat_file("/data/big.bin", 1_000_000) == BIG[1_000_000:]
    assert fs.cat_file("/data/big.bin", -100) == BIG[-100:]
    assert fs.cat_file("/data/big.bin", -2_000_000) == BIG[-2_000_000:]
    assert fs.cat_file("/data/big.bin", -100, -10) == BIG[-100:-10]
    assert fs.cat_file("/data/big.bin", 10, -10) == BIG[10:-10]
    assert fs.cat_file("/data/big.bin", len(BIG) - 5, len(BIG) + 100) == BIG[-5:]
    assert fs.cat_file("/data/big.bin", len(BIG) + 1, len(BIG) + 100) == b""
    assert fs.cat_file("/data/big.bin", 50, 50) == b""
    assert fs.cat_file("/data/small.txt", -100) == b"hello depot\n"
    assert fs.cat(["/data/small.txt", "/data/sub/a.csv"]) == {
        "/data/small.txt": b"hello depot\n",
        "/data/sub/a.csv": b"x,y\n1,2\n3,4\n",
    }
    assert fs.head("/data/big.bin", 10) == BIG[:10]
    assert fs.tail("/data/big.bin", 10) == BIG[-10:]


def test_cat_ranges(fs: DepotFileSystem) -> None:
    starts = [0, PAGE - 1, 2_000_000, -50, len(BIG) + 10, 0]
    ends = [10, PAGE + 1, 2_500_000, None, len(BIG) + 20, 5]
    paths = ["/data/big.bin"] * 5 + ["depot://data/small.txt"]
    assert fs.cat_ranges(paths, starts, ends) == [
        BIG[:10],
        BIG[PAGE - 1 : PAGE + 1],
        BIG[2_000_000:2_500_000],
        BIG[-50:],
        b"",
        b"hello",
    ]
    out = fs.cat_ranges(["/data/big.bin", "/data/missing"], 0, 4)
    assert out[0] == BIG[:4] and isinstance(out[1], FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        fs.cat_ranges(["/data/missing"], 0, 4, on_error="raise")


def test_get_copies_files_and_trees(fs: DepotFileSystem, tmp_path: Path) -> None:
    fs.get("/data/big.bin", str(tmp_path / "big.bin"))
    assert (tmp_path / "big.bin").read_bytes() == BIG
    fs.get("/data/sub", str(tmp_path / "tree"), recursive=True)
    assert (tmp_path / "tree" / "a.csv").read_bytes() == b"x,y\n1,2\n3,4\n"
    assert (tmp_path / "tree" / "deep" / "b.json").read_bytes() == b'{"k": 1}'
    fs.get("/data/empty", str(tmp_path / "empty"))
    assert (tmp_path / "empty").read_bytes() == b""


# -- open files --------------------------------------------------------------------------------------


def test_open_read_seek_tell(fs: DepotFileSystem) -> None:
    with fs.open("depot://data/big.bin", "rb") as f:
        assert f.size == len(BIG) and f.tell() == 0
        assert f.read(10) == BIG[:10] and f.tell() == 10
        f.seek(PAGE - 5)
        assert f.read(10) == BIG[PAGE - 5 : PAGE + 5]
        f.seek(-20, os.SEEK_END)
        assert f.read(100) == BIG[-20:]  # past EOF: cut short
        assert f.read(100) == b"" and f.tell() == len(BIG)
        f.seek(1_000_000)
        f.seek(16, os.SEEK_CUR)
        assert f.tell() == 1_000_016
        assert f.read() == BIG[1_000_016:]
        f.seek(len(BIG) + 100)
        assert f.read(10) == b""
        with pytest.raises(ValueError):
            f.seek(-1)
    assert f.closed
    with pytest.raises(ValueError):
        f.read(1)


def test_readinto_and_lines(fs: DepotFileSystem) -> None:
    with fs.open("/data/big.bin") as f:
        buf = bytearray(2 * 1024 * 1024)
        f.seek(123)
        assert f.readinto(buf) == len(buf) and buf == BIG[123 : 123 + len(buf)]
        assert f.readinto(buf) == len(BIG) - 123 - len(buf)
    with fs.open("/data/lines.txt") as f:
        lines = list(f)
        assert len(lines) == 5000 and lines[1234] == b"line 1234\n"
    with fs.open("/data/lines.txt", "r") as text:
        assert text.readline() == "line 0\n"
        assert text.read().count("\n") == 4999
    with fsspec.open("depot://data/small.txt", "rt", endpoint=fs.endpoint) as f2:
        assert f2.read() == "hello depot\n"


@pytest.mark.parametrize("chunk", [1, 777, 4096, PAGE, 300_000, 1 << 20])
def test_sequential_reads_return_every_byte(fs: DepotFileSystem, chunk: int) -> None:
    limit = 200_000 if chunk == 1 else len(BIG)
    pieces = []
    with fs.open("/data/big.bin", read_ahead=256 * 1024) as f:
        got = 0
        while got < limit:
            piece = f.read(chunk)
            if not piece:
                break
            pieces.append(piece)
            got += len(piece)
    assert b"".join(pieces)[:limit] == BIG[:limit]


def test_sequential_reads_prefetch_and_random_reads_do_not(fs: DepotFileSystem) -> None:
    with fs.open("/data/big.bin", read_ahead=512 * 1024) as f:
        f.read(1000)
        assert not f._blocks  # one read is not a pattern
        f.read(1000)
        assert f._blocks  # the second, contiguous one starts the read-ahead
        assert max(b.end for b in f._blocks.values()) >= 2000 + 512 * 1024
        f.seek(2_500_000)
        f.read(1000)
        assert not f._blocks  # a jump drops the window
        f.seek(100)
        f.read(10)
        assert not f._blocks
    with fs.open("/data/big.bin", read_ahead=0) as f:
        f.read(1000)
        f.read(1000)
        assert not f._blocks


def test_equal_aligned_reads_get_their_blocks_without_a_copy(worker: LocalWorker) -> None:
    config = DepotConfig.model_validate({"client": {"short_circuit": False}})
    fs = DepotFileSystem(endpoint=worker.endpoint, config=config, skip_instance_cache=True)
    chunk = 1 << 20  # the filesystem's block size (BIG is 3 chunks and a bit)
    with fs.open("/data/big.bin", read_ahead=2 * chunk) as f:
        assert f.read(chunk) == BIG[:chunk]
        assert f.read(chunk) == BIG[chunk : 2 * chunk]  # sequential: the read-ahead starts
        assert f._whole_blocks and f._block_size == chunk
        blocks = [f._blocks[2], f._blocks[3]]
        assert all(b.pool is None for b in blocks)  # result objects, not pooled buffers
        third, last = f.read(chunk), f.read(chunk)
        assert third is blocks[0].buf  # handed over as received (the short tail is copied)
        assert third + last == BIG[2 * chunk :] and not f._blocks
    with fs.open("/data/big.bin", read_ahead=chunk) as f:
        pieces = [f.read(chunk), f.read(chunk), f.read(1000), f.read(chunk), f.read(777)]
        assert b"".join(pieces) == BIG[: 3 * chunk + 1777]
        f.seek(0)
        assert f.read(chunk) == BIG[:chunk] and f.read(chunk) == BIG[chunk : 2 * chunk]
        assert f.read() == BIG[2 * chunk :]
    with fs.open("/data/big.bin", read_ahead=chunk) as f:
        f.seek(1000)  # not aligned to the read size: pooled blocks
        assert f.read(chunk) == BIG[1000 : 1000 + chunk]
        assert f.read(chunk) == BIG[1000 + chunk : 1000 + 2 * chunk]
        assert not f._whole_blocks and all(b.pool is not None for b in f._blocks.values())
    fs.close()


def test_unsupported_modes_are_refused_clearly(fs: DepotFileSystem) -> None:
    # Whole-file writes are supported (tests/integration/test_writes.py); appends are not.
    with pytest.raises(Unsupported, match="mode"):
        fs.open("/data/new.bin", "ab")
    with pytest.raises(NotImplementedError):
        fs.open("/data/new.bin", "r+b")
    with fs.open("/data/small.txt", "rb") as f, pytest.raises(Unsupported):
        f.write(b"x")


# -- pandas and pyarrow -------------------------------------------------------------------------------


def test_pandas_and_pyarrow_read_parquet(fs: DepotFileSystem) -> None:
    df = pd.read_parquet("depot://data/t.parquet", storage_options={"endpoint": fs.endpoint})
    assert len(df) == 20_000 and df["name"].iloc[19_999] == "n19999"
    table = pq.read_table("/data/t.parquet", filesystem=fs, columns=["id"])
    assert table.num_rows == 20_000 and table.column("id")[12_345].as_py() == 12_345
    dataset = pq.ParquetFile(fs.open("/data/t.parquet"))
    assert dataset.metadata.num_row_groups == 4
    assert dataset.read_row_group(2).column("id")[0].as_py() == 10_000
    csv = pd.read_csv("depot://data/sub/a.csv", storage_options={"endpoint": fs.endpoint})
    assert csv["y"].tolist() == [2, 4]


def test_fsspec_entry_point_and_url_chaining(worker: LocalWorker) -> None:
    fs = fsspec.filesystem("depot", endpoint=worker.endpoint)
    assert isinstance(fs, DepotFileSystem)
    with fsspec.open("depot://data/small.txt", endpoint=worker.endpoint) as f:
        assert f.read() == b"hello depot\n"
    with fsspec.open(
        "simplecache::depot://data/small.txt", depot={"endpoint": worker.endpoint}
    ) as f:
        assert f.read() == b"hello depot\n"


def test_endpoint_from_environment(worker: LocalWorker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPOT_ENDPOINT", worker.endpoint)
    fs = DepotFileSystem(skip_instance_cache=True)
    assert fs.cat_file("/data/small.txt") == b"hello depot\n"


# -- versions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("short_circuit", [True, False])
def test_open_file_is_pinned_to_its_version(tmp_path: Path, short_circuit: bool) -> None:
    """With revalidation on every read, an overwrite makes the open file fail, never mix
    (whether the worker's pages are read here or over HTTP from this thread)."""
    (tmp_path / "ufs").mkdir()
    target = tmp_path / "ufs" / "f.bin"
    old = b"A" * (3 * PAGE)
    target.write_bytes(old)
    with LocalWorker(
        ufs_uri=(tmp_path / "ufs").as_uri(),
        cache_dir=tmp_path / "cache",
        page_size=PAGE,
        metadata="always",
    ) as w:
        config = DepotConfig(client={"short_circuit": short_circuit})
        fs = DepotFileSystem(endpoint=w.endpoint, config=config, skip_instance_cache=True)
        with fs.open("/f.bin", read_ahead=0) as f:
            assert f.read(PAGE) == old[:PAGE]
            target.write_bytes(b"B" * (3 * PAGE + 1))
            with pytest.raises(StaleVersion):
                f.read(PAGE)
            f.seek(0)
            with pytest.raises(StaleVersion):
                f.read(10)
        with fs.open("/f.bin") as f:
            assert f.read() == b"B" * (3 * PAGE + 1)
        client = fs.client_now()
        assert client is not None
        assert (client.read_now_stats["served"] > 0) is not short_circuit
        fs.close()


def test_open_file_keeps_reading_its_cached_version(tmp_path: Path) -> None:
    """With a metadata max-age, an open file whose pages are cached keeps its version."""
    (tmp_path / "ufs").mkdir()
    target = tmp_path / "ufs" / "f.bin"
    old = bytes(range(256)) * (3 * PAGE // 256)
    target.write_bytes(old)
    with LocalWorker(
        ufs_uri=(tmp_path / "ufs").as_uri(),
        cache_dir=tmp_path / "cache",
        page_size=PAGE,
        metadata="max-age=60s",
    ) as w:
        fs = DepotFileSystem(endpoint=w.endpoint, config=DepotConfig(), skip_instance_cache=True)
        with fs.open("/f.bin") as f:
            assert f.read(PAGE) == old[:PAGE]
            f.read(1)
            target.write_bytes(b"new" * PAGE)
            try:
                rest = f.read()
            except StaleVersion:
                pass  # the worker noticed the change: failing is allowed, mixing is not
            else:
                assert rest == old[PAGE + 1 :]
        fs.close()


# -- falling back to the under store -----------------------------------------------------------------


def test_reads_continue_from_ufs_when_worker_stops(ufs: Path, tmp_path: Path) -> None:
    config = DepotConfig(mounts=[MountConfig(path="/", ufs=ufs.as_uri())])
    worker = LocalWorker(ufs_uri=ufs.as_uri(), cache_dir=tmp_path / "cache", page_size=PAGE).start()
    fs = DepotFileSystem(endpoint=worker.endpoint, config=config, skip_instance_cache=True)
    try:
        assert fs.cat_file("/data/small.txt") == b"hello depot\n"
        f = fs.open("/data/big.bin", read_ahead=0)
        assert f.read(1000) == BIG[:1000]
    finally:
        worker.stop()
    assert fs.cat_file("/data/small.txt") == b"hello depot\n"
    assert f.read(2 * PAGE) == BIG[1000 : 1000 + 2 * PAGE]  # same version, checked by the UFS
    f.seek(0)
    assert f.read() == BIG
    f.close()
    assert fs.info("/data/sub")["type"] == "directory"
    assert fs.ls("/data/sub", detail=False) == ["/data/sub/a.csv", "/data/sub/deep"]
    assert fs.find("/data/sub") == ["/data/sub/a.csv", "/data/sub/deep/b.json"]
    assert fs.cat_file("/data/big.bin", -10) == BIG[-10:]
    with pytest.raises(FileNotFoundError):
        fs.info("/data/missing")
    df = pd.read_parquet(io.BytesIO(fs.cat_file("/data/t.parquet")))
    assert len(df) == 20_000
    fs.close()


def test_small_reads_from_plain_threads_skip_the_event_loop(ufs: Path, tmp_path: Path) -> None:
    """Small sync reads of a remote worker go out from the caller's thread; every byte is the
    same as through the loop, a changed file is still refused, a stopped worker still falls
    back to the under store."""
    config = DepotConfig(
        mounts=[MountConfig(path="/", ufs=ufs.as_uri())], client={"short_circuit": False}
    )
    worker = LocalWorker(ufs_uri=ufs.as_uri(), cache_dir=tmp_path / "cache", page_size=PAGE).start()
    fs = DepotFileSystem(endpoint=worker.endpoint, config=config, skip_instance_cache=True)
    try:
        assert fs.cat_file("/data/small.txt") == b"hello depot\n"  # the loop: routes, pools
        client = fs.client_now()
        assert client is not None
        offsets = [0, 5, PAGE - 3, 2 * PAGE, len(BIG) - 4096, len(BIG) - 10, len(BIG)]
        for off in offsets:
            assert fs.cat_file("/data/big.bin", off, off + 4096) == BIG[off : off + 4096]
        with fs.open("/data/big.bin", read_ahead=0) as f:
            for off in reversed(offsets):
                f.seek(off)
                assert f.read(4096) == BIG[off : off + 4096]
            buf = bytearray(70_000)
            f.seek(PAGE - 100)
            assert f.readinto(buf) == len(buf) and bytes(buf) == BIG[PAGE - 100 : PAGE + 69_900]
        served = client.read_now_stats["served"]
        assert served >= 2 * len(offsets) - 2, client.read_now_stats  # (reads at the end: none)
        f = fs.open("/data/big.bin", read_ahead=0)
        assert f.read(100) == BIG[:100]
    finally:
        worker.stop()
    # A dead worker: each read is handed back to the loop, which reads the under store.
    f.seek(PAGE)
    assert f.read(4096) == BIG[PAGE : PAGE + 4096]
    assert fs.cat_file("/data/big.bin", 10, 20) == BIG[10:20]
    assert client.read_now_stats["handed_back"] >= 1
    f.close()
    fs.close()


def test_info_from_plain_threads_skips_the_event_loop(ufs: Path, tmp_path: Path) -> None:
    """``info`` from a plain thread asks the worker from that thread: the same answers as
    through the loop, missing files are still FileNotFoundError, a stopped worker still falls
    back to the under store."""
    config = DepotConfig(mounts=[MountConfig(path="/", ufs=ufs.as_uri())])
    worker = LocalWorker(ufs_uri=ufs.as_uri(), cache_dir=tmp_path / "cache", page_size=PAGE).start()
    fs = DepotFileSystem(endpoint=worker.endpoint, config=config, skip_instance_cache=True)
    try:
        through_loop = fs.ls("/data", detail=True)  # the loop: routes, pools
        client = fs.client_now()
        assert client is not None
        for entry in through_loop:
            assert fs.info(entry["name"]) == entry
        with pytest.raises(FileNotFoundError):
            fs.info("/data/nope")
        assert client.stat_now_stats == {"served": len(through_loop), "handed_back": 0}
        assert fs.info("/")["type"] == "directory"  # the root: through the loop
    finally:
        worker.stop()
    assert fs.info("/data/small.txt")["size"] == len(b"hello depot\n")
    assert client.stat_now_stats["handed_back"] == 1
    fs.close()


def test_stopped_worker_without_fallback_is_an_error(ufs: Path, tmp_path: Path) -> None:
    worker = LocalWorker(ufs_uri=ufs.as_uri(), cache_dir=tmp_path / "cache").start()
    endpoint = worker.endpoint
    worker.stop()
    config = DepotConfig(mounts=[MountConfig(path="/", ufs=ufs.as_uri())])
    fs = DepotFileSystem(
        endpoint=endpoint, config=config, ufs_fallback=False, skip_instance_cache=True
    )
    with pytest.raises(Unavailable, match="refused"):
        fs.cat_file("/data/small.txt")
    with pytest.raises(Unavailable, match="refused"):
        fs.exists(f"/data/{uuid.uuid4().hex}")  # unknown is not "does not exist"


# -- async use and pickling --------------------------------------------------------------------------


async def test_async_core_on_the_callers_loop(worker: LocalWorker) -> None:
    fs = DepotFileSystem(
        endpoint=worker.endpoint, config=DepotConfig(), asynchronous=True, skip_instance_cache=True
    )
    assert await fs._cat_file("depot://data/small.txt") == b"hello depot\n"
    assert (await fs._info("/data/big.bin"))["size"] == len(BIG)
    assert await fs._ls("/data/sub", detail=False) == ["/data/sub/a.csv", "/data/sub/deep"]
    assert await fs._cat_ranges(["/data/big.bin"] * 2, [0, -4], [4, None]) == [BIG[:4], BIG[-4:]]
    await fs._close()


def test_filesystem_and_open_files_pickle(fs: DepotFileSystem) -> None:
    clone = pickle.loads(pickle.dumps(fs))
    assert clone.cat_file("/data/small.txt") == b"hello depot\n"
    with fs.open("/data/big.bin") as f:
        f.seek(12345)
        reopened = pickle.loads(pickle.dumps(f))
        assert reopened.tell() == 12345 and reopened.read(100) == BIG[12345:12445]
        reopened.close()


def test_concurrent_readers_share_the_block_pool(fs: DepotFileSystem) -> None:
    def read_all(chunk: int) -> bytes:
        with fs.open("/data/big.bin", read_ahead=512 * 1024) as f:
            return b"".join(iter(lambda: f.read(chunk), b""))

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(read_all, [4096, 100_000, 333_333, 1 << 20]))
    assert all(r == BIG for r in results)


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.integers(-1, 300_000)),
        st.tuples(st.just("readinto"), st.integers(0, 300_000)),
        st.tuples(st.just("seek"), st.integers(0, len(BIG) + 1000)),
        st.tuples(st.just("seek_cur"), st.integers(-200_000, 200_000)),
        st.tuples(st.just("seek_end"), st.integers(-300_000, 10)),
    ),
    max_size=20,
)


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_OPS, read_ahead=st.sampled_from([0, PAGE, 512 * 1024]))
def test_reads_match_a_plain_bytes_file(
    fs: DepotFileSystem, ops: list[tuple[str, int]], read_ahead: int
) -> None:
    """Any mix of seeks and reads returns what an in-memory file of the same bytes returns."""
    model = io.BytesIO(BIG)
    with fs.open("/data/big.bin", read_ahead=read_ahead) as f:
        for op, n in ops:
            if op == "read":
                if n == -1 and model.tell() < len(BIG) - 400_000:
                    n = 1000  # keep whole-file reads rare
                assert f.read(n) == model.read(n)
            elif op == "readinto":
                mine, theirs = bytearray(n), bytearray(n)
                assert f.readinto(mine) == model.readinto(theirs)
                assert mine == theirs
            else:
                whence = {"seek": os.SEEK_SET, "seek_cur": os.SEEK_CUR, "seek_end": os.SEEK_END}[op]
                target = {"seek": 0, "seek_cur": model.tell(), "seek_end": len(BIG)}[op] + n
                if target < 0:
                    continue
                assert f.seek(n, whence) == model.seek(n, whence)
            assert f.tell() == model.tell()


def test_cache_stats_count_reads(fs: DepotFileSystem) -> None:
    before = fs.cache_stats()
    fs.cat_file("/data/big.bin", 0, PAGE)
    after = fs.cache_stats()
    assert after["hits"] + after["misses"] > before["hits"] + before["misses"]
