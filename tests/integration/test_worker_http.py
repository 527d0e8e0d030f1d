"""A real worker over a local directory, driven over HTTP: the read-through guarantees."""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from depot.testing.local import LocalWorker

PAGE = 64 * 1024


class Http:
    """A tiny keep-alive client so these tests do not depend on depot's own client."""

    def __init__(self, endpoint: str) -> None:
        parts = urlsplit(endpoint)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80

    def get(self, route: str, path: str | None = None, headers: dict[str, str] | None = None,
            raw_query: str | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        query = raw_query if raw_query is not None else (f"path={quote(path, safe='')}" if path is not None else "")
        conn.request("GET", route + (f"?{query}" if query else ""), headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body

    def json(self, route: str, path: str | None = None) -> Any:
        status, _, body = self.get(route, path)
        assert status == 200, body
        return json.loads(body)

    def read(self, path: str, rng: str | None = None, **headers: str) -> tuple[int, dict[str, str], bytes]:
        h = dict(headers)
        if rng:
            h["Range"] = rng
        return self.get("/api/v1/read", path, h)

    def stats(self) -> dict[str, Any]:
        return dict(self.json("/api/v1/cache/stats"))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "ufs"
    (root / "dir" / "nested").mkdir(parents=True)
    (root / "a.bin").write_bytes(os.urandom(5 * PAGE + 123))
    (root / "dir" / "b.txt").write_text("hello world\n")
    (root / "dir" / "nested" / "c.txt").write_text("c")
    (root / "empty").write_bytes(b"")
    (root / "sp ace é.txt").write_text("unicode")
    return root


@pytest.fixture
def worker(tmp_path: Path, data_dir: Path) -> Iterator[LocalWorker]:
    with LocalWorker(data_dir.as_uri(), tmp_path / "cache", page_size=PAGE, cache_size="64MiB",
                     metadata="always") as w:
        yield w


def test_second_read_is_served_from_cache(worker: LocalWorker, data_dir: Path) -> None:
    api = Http(worker.endpoint)
    expected = (data_dir / "a.bin").read_bytes()
    status, headers, body = api.read("/a.bin")
    assert status == 200 and body == expected and headers["x-depot-cache"] == "miss"
    assert headers["x-depot-size"] == str(len(expected))
    first = api.stats()
    assert first["misses"] == 6 and first["hits"] == 0 and first["ufs_reads"] == 6
    status, headers, body = api.read("/a.bin")
    assert body == expected and headers["x-depot-cache"] == "hit"
    second = api.stats()
    assert second["hits"] == 6 and second["ufs_reads"] == 6
    assert second["bytes_from_cache"] == len(expected)


@pytest.mark.parametrize(
    ("rng", "lo", "hi"),
    [("bytes=0-0", 0, 1), ("bytes=100-199", 100, 200), (f"bytes={PAGE - 10}-{PAGE + 10}", PAGE - 10, PAGE + 11),
     ("bytes=-50", -50, None), (f"bytes={3 * PAGE}-", 3 * PAGE, None), ("bytes=0-99999999", 0, None)],
)
def test_ranges(worker: LocalWorker, data_dir: Path, rng: str, lo: int, hi: int | None) -> None:
    expected = (data_dir / "a.bin").read_bytes()[lo:hi]
    api = Http(worker.endpoint)
    for _ in range(2):  # cold, then hot
        status, headers, body = api.read("/a.bin", rng)
        assert status == 206 and body == expected
        size = PAGE * 5 + 123
        start = lo if lo >= 0 else size + lo
        assert headers["content-range"] == f"bytes {start}-{start + len(expected) - 1}/{size}"


def test_empty_file_and_unicode_names(worker: LocalWorker) -> None:
    api = Http(worker.endpoint)
    assert api.read("/empty")[2] == b""
    assert api.read("/empty", "bytes=0-10")[0] == 200
    assert api.read("/sp ace é.txt")[2] == b"unicode"


def test_stat_and_list(worker: LocalWorker) -> None:
    api = Http(worker.endpoint)
    st = api.json("/api/v1/stat", "/dir/b.txt")
    assert st["size"] == 12 and st["type"] == "file" and st["path"] == "/dir/b.txt"
    assert api.json("/api/v1/stat", "/dir")["type"] == "directory"
    assert api.json("/api/v1/stat", "/")["type"] == "directory"
    listing = api.json("/api/v1/list", "/dir")
    assert [(e["path"], e["type"]) for e in listing["entries"]] == [
        ("/dir/b.txt", "file"), ("/dir/nested", "directory")]
    names = [e["path"] for e in api.json("/api/v1/list", "/")["entries"]]
    assert names == ["/a.bin", "/dir", "/empty", "/sp ace é.txt"]


def test_a_listing_is_written_one_entry_dict_at_a_time(
    worker: LocalWorker, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker writes a listing's statuses without a list of their dicts: ten thousand
    dicts alive at once lived through the collector's young generations and brought on a full
    collection every few listings. The answer is the same JSON as ``to_dict`` gives."""
    from depot.core.types import FileStatus

    for i in range(200):
        (data_dir / "dir" / f"f{i:03d}").write_bytes(b"x")
    alive = [0, 0]  # entry dicts alive now, the most at once

    class EntryDict(dict[str, Any]):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            alive[0] += 1
            alive[1] = max(alive)

        def __del__(self) -> None:
            alive[0] -= 1

    plain = FileStatus.to_dict
    monkeypatch.setattr(FileStatus, "to_dict", lambda status: EntryDict(plain(status)))
    listing = Http(worker.endpoint).json("/api/v1/list", "/dir")
    monkeypatch.undo()
    entries = listing["entries"]
    assert [e["path"] for e in entries[:2]] == ["/dir/b.txt", "/dir/f000"]
    assert {frozenset(e) for e in entries} == {frozenset(FileStatus("/x", 0, 0.0).to_dict())}
    assert (entries[0]["size"], entries[0]["type"]) == (12, "file")
    assert 1 <= alive[1] <= 2


@pytest.mark.parametrize(
    ("route", "query", "status", "code"),
    [
        ("/api/v1/read", "path=%2F..%2Fetc%2Fpasswd", 400, "InvalidPath"),
        ("/api/v1/read", "path=%2Fdir%2F%252e%252e%2F%252e%252e", 400, "InvalidPath"),
        ("/api/v1/read", "path=%2Fa%00b", 400, "InvalidPath"),
        ("/api/v1/read", "path=%2F%EF%BC%8E%EF%BC%8E%2Fx", 400, "InvalidPath"),
        ("/api/v1/read", "path=%ff", 400, "InvalidArgument"),
        ("/api/v1/read", "", 400, "InvalidArgument"),
        ("/api/v1/read", "path=%2Fa.bin&path=%2Fb", 400, "InvalidArgument"),
        ("/api/v1/read", "path=%2Fnope", 404, "NotFound"),
        ("/api/v1/read", "path=%2Fdir", 400, "IsADirectory"),
        ("/api/v1/list", "path=%2Fa.bin", 400, "NotADirectory"),
        ("/api/v1/list", "path=%2Fnope", 404, "NotFound"),
        ("/api/v1/stat", "path=%2Fnope", 404, "NotFound"),
        ("/api/v1/nope", "", 404, "NotFound"),
    ],
)
def test_bad_requests_get_clear_errors(worker: LocalWorker, route: str, query: str, status: int, code: str) -> None:
    got, headers, body = Http(worker.endpoint).get(route, raw_query=query)
    assert got == status, body
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == code


@pytest.mark.parametrize("rng", ["bytes=abc", "bytes=10-5", "bytes=0-1,5-6", "lines=1-2", f"bytes={10 * PAGE}-"])
def test_bad_ranges_are_416(worker: LocalWorker, rng: str) -> None:
    status, _, body = Http(worker.endpoint).read("/a.bin", rng)
    assert status == 416 and json.loads(body)["error"]["code"] == "InvalidRange"


def test_if_match_pins_a_version(worker: LocalWorker, data_dir: Path) -> None:
    api = Http(worker.endpoint)
    _, headers, _ = api.read("/dir/b.txt")
    etag = headers["etag"]
    assert api.read("/dir/b.txt", **{"If-Match": etag})[0] == 200
    time.sleep(0.01)
    (data_dir / "dir" / "b.txt").write_text("changed!!!!!\n")
    status, _, body = api.read("/dir/b.txt", **{"If-Match": etag})
    assert status == 412 and json.loads(body)["error"]["code"] == "StaleVersion"


def test_changed_object_is_never_served_stale(worker: LocalWorker, data_dir: Path) -> None:
    api = Http(worker.endpoint)
    path = data_dir / "a.bin"
    old = path.read_bytes()
    assert api.read("/a.bin")[2] == old
    assert api.read("/a.bin")[1]["x-depot-cache"] == "hit"
    new = os.urandom(len(old))  # same size: only the version tells them apart
    time.sleep(0.01)
    path.write_bytes(new)
    _status, headers, body = api.read("/a.bin")
    assert body == new and headers["x-depot-cache"] == "miss"
    assert api.stats()["stale_dropped_files"] >= 1
    assert api.read("/a.bin", "bytes=100-200")[2] == new[100:201]


def test_max_age_policy_revalidates_after_expiry(tmp_path: Path, data_dir: Path) -> None:
    with LocalWorker(data_dir.as_uri(), tmp_path / "c2", page_size=PAGE, metadata="max-age=300ms") as w:
        api = Http(w.endpoint)
        assert api.read("/dir/b.txt")[2] == b"hello world\n"
        (data_dir / "dir" / "b.txt").write_text("HELLO WORLD\n")
        time.sleep(0.4)
        assert api.read("/dir/b.txt")[2] == b"HELLO WORLD\n"


def test_immutable_policy_trusts_the_cache(tmp_path: Path, data_dir: Path) -> None:
    with LocalWorker(data_dir.as_uri(), tmp_path / "c3", page_size=PAGE, metadata="immutable") as w:
        api = Http(w.endpoint)
        assert api.read("/dir/b.txt")[2] == b"hello world\n"
        before = api.stats()["metadata"]
        assert api.read("/dir/b.txt")[2] == b"hello world\n"
        assert api.stats()["metadata"]["revalidations"] == before["revalidations"]


def test_restarted_worker_serves_its_old_cache(tmp_path: Path, data_dir: Path) -> None:
    cache = tmp_path / "cache-r"
    expected = (data_dir / "a.bin").read_bytes()
    with LocalWorker(data_dir.as_uri(), cache, page_size=PAGE, metadata="immutable") as w:
        assert Http(w.endpoint).read("/a.bin")[2] == expected
        worker_id = Http(w.endpoint).json("/api/v1/info")["worker_id"]
    with LocalWorker(data_dir.as_uri(), cache, page_size=PAGE, metadata="immutable") as w:
        api = Http(w.endpoint)
        assert api.json("/api/v1/info")["worker_id"] == worker_id
        _status, headers, body = api.read("/a.bin")
        assert body == expected and headers["x-depot-cache"] == "hit"
        stats = api.stats()
        assert stats["ufs_reads"] == 0 and stats["hits"] == 6
        assert stats["metadata"]["revalidations"] == 0  # status came from RocksDB


@pytest.mark.parametrize("memory_size", [0, "auto"])
def test_corrupt_page_is_dropped_and_read_again(
    data_dir: Path, tmp_path: Path, memory_size: int | str
) -> None:
    """A damaged page file is found and its page fetched again, with or without a memory tier
    (a cold read's pages are not held: the next read reads their files)."""
    with LocalWorker(data_dir.as_uri(), tmp_path / "cache", page_size=PAGE, cache_size="64MiB",
                     metadata="always", extra={"cache": {"memory_size": memory_size}}) as worker:
        api = Http(worker.endpoint)
        expected = (data_dir / "a.bin").read_bytes()
        api.read("/a.bin")
        page_files = sorted(p for p in (tmp_path / "cache").rglob("*")
                            if p.is_file() and p.stat().st_size >= PAGE)
        assert page_files
        for p in page_files:
            raw = bytearray(p.read_bytes())
            raw[100] ^= 0xFF
            p.write_bytes(bytes(raw))
        status, _, body = api.read("/a.bin")
        assert status == 200 and body == expected
        stats = api.stats()
        assert stats["corrupt_dropped"] >= 1 and stats["memory_hits"] == 0


def test_concurrent_misses_share_one_ufs_read(worker: LocalWorker, data_dir: Path) -> None:
    api = Http(worker.endpoint)
    expected = (data_dir / "a.bin").read_bytes()
    with ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda _: api.read("/a.bin")[2], range(8)))
    assert all(b == expected for b in bodies)
    stats = api.stats()
    assert stats["ufs_reads"] == 6, stats  # 6 pages, however many readers


def test_dead_ufs_is_503_not_a_hang(tmp_path: Path) -> None:
    mounts = [{"path": "/", "ufs": "s3://bucket/p", "options": {
        "endpoint": "http://127.0.0.1:9", "region": "us-east-1", "allow_http": "true",
        "access_key_id": "x", "secret_access_key": "y"}}]
    with LocalWorker(None, tmp_path / "c4", mounts=mounts,
                     extra={"ufs": {"retries": 1, "backoff_base": 0.01, "timeout": 5}}) as w:
        t0 = time.monotonic()
        status, headers, body = Http(w.endpoint).read("/x.bin")
        assert status == 503, body
        assert json.loads(body)["error"]["code"] in ("Unavailable", "Timeout")
        assert headers.get("retry-after") == "1"
        assert time.monotonic() - t0 < 20


def test_openapi_lists_every_route(worker: LocalWorker) -> None:
    spec = Http(worker.endpoint).json("/openapi.json")
    assert spec["openapi"].startswith("3.")
    assert set(spec["paths"]) == {"/healthz", "/api/v1/info", "/api/v1/stat", "/api/v1/list",
                                  "/api/v1/read", "/api/v1/cache/stats", "/api/v1/cluster",
                                  "/openapi.json", "/metrics", "/api/v1/cache/load", "/api/v1/cache/free",
                                  "/api/v1/cache/hits",
                                  "/api/v1/jobs", "/api/v1/jobs/{job_id}",
                                  "/api/v1/jobs/{job_id}/stop", "/api/v1/write",
                                  "/api/v1/file", "/api/v1/mkdir", "/api/v1/rename",
                                  "/api/v1/sync", "/api/v1/write/open", "/api/v1/write/commit",
                                  "/api/v1/write/abort"}
    assert Http(worker.endpoint).json("/healthz") == {"status": "ok"}


def test_directories_above_mounts_are_virtual(tmp_path: Path, data_dir: Path) -> None:
    mounts = [{"path": "/a", "ufs": data_dir.as_uri()}, {"path": "/b/c", "ufs": (data_dir / "dir").as_uri()}]
    with LocalWorker(None, tmp_path / "c5", mounts=mounts) as w:
        api = Http(w.endpoint)
        assert api.json("/api/v1/stat", "/")["type"] == "directory"
        assert [e["path"] for e in api.json("/api/v1/list", "/")["entries"]] == ["/a", "/b"]
        assert [e["path"] for e in api.json("/api/v1/list", "/b")["entries"]] == ["/b/c"]
        assert api.read("/b/c/b.txt")[2] == b"hello world\n"
        assert api.get("/api/v1/stat", "/zzz")[0] == 404


def test_416_names_the_size(worker: LocalWorker) -> None:
    status, headers, _ = Http(worker.endpoint).read("/a.bin", "bytes=99999999-")
    assert status == 416 and headers["content-range"] == f"bytes */{5 * PAGE + 123}"


def test_etag_is_a_valid_entity_tag(worker: LocalWorker) -> None:
    etag = Http(worker.endpoint).read("/a.bin", "bytes=0-0")[1]["etag"]
    assert etag.startswith('"') and etag.endswith('"') and '"' not in etag[1:-1]


@pytest.mark.parametrize("keep", [True, False])
def test_worker_asks_the_allocator_to_keep_freed_blocks(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: bool
) -> None:
    """``worker.keep_freed_blocks`` (default on): fetched pages' freed blocks are reused, and
    every thread of the worker allocates from the one heap that keeps them."""
    import depot.worker.daemon as daemon

    calls: list[dict[str, bool]] = []
    monkeypatch.setattr(daemon, "keep_freed_blocks", lambda **kw: calls.append(kw) or True)
    with LocalWorker(data_dir.as_uri(), tmp_path / "cache", page_size=PAGE,
                     extra={"worker": {"keep_freed_blocks": keep}}) as worker:
        assert Http(worker.endpoint).read("/a.bin")[0] == 200
    assert calls == ([{"one_heap": True}] if keep else [])
